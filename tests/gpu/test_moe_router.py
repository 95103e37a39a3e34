"""The fused top-k router kernel against the torch router (``select_experts``): the same experts per token, the
same weights, the expert-load counts of the counted rows. Natively on CUDA here; in Triton's CPU interpreter through
``tests/unit/test_moe_router_interpreter.py``."""

from __future__ import annotations

import pytest
import torch

from sgl_ray.layers.moe.base import count_experts
from sgl_ray.layers.moe.router import RouterConfig, select_experts

CONFIGS = [
    RouterConfig(16, 4),  # Qwen3-MoE-like: softmax, renormalized
    RouterConfig(16, 4, renormalize=False),  # OLMoE, Qwen2-MoE
    RouterConfig(12, 2, softmax_after_topk=True),  # GPT-OSS (E not a power of two)
    RouterConfig(16, 3, scoring="sigmoid", routed_scaling_factor=2.5, correction_bias=True),
    RouterConfig(128, 8),  # Qwen3-30B-A3B
]


def check_router(device: str, config: RouterConfig, tokens: int = 7) -> None:
    from sgl_ray.layers.moe.triton_router import topk_router

    g = torch.Generator().manual_seed(config.num_experts + config.top_k)
    logits = torch.randn(tokens, config.num_experts, generator=g).to(device)
    bias = (torch.randn(config.num_experts, generator=g) * 0.1).to(device) if config.correction_bias else None
    want = select_experts(logits, config, bias)
    counts = torch.zeros(config.num_experts, dtype=torch.int64, device=device)
    rows = (torch.arange(tokens, device=device) % 3 != 2).to(torch.int64)  # every third row not counted
    got = topk_router(logits, config, bias, counts, rows)
    assert torch.equal(got.ids.sort(1).values, want.ids.sort(1).values), config
    order_got, order_want = got.ids.long().argsort(1), want.ids.long().argsort(1)
    torch.testing.assert_close(got.weights.gather(1, order_got), want.weights.gather(1, order_want))
    expected = torch.zeros_like(counts)
    count_experts(expected, want.ids, rows != 0)
    assert torch.equal(counts, expected), config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_router_matches_torch(config):
    check_router("cuda", config, tokens=300)
