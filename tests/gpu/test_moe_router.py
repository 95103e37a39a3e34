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
    if device == "cpu":  # best first, as torch.topk orders them
        assert torch.equal(got.ids, want.ids), config
    order_got, order_want = got.ids.long().argsort(1), want.ids.long().argsort(1)
    torch.testing.assert_close(got.weights.gather(1, order_got), want.weights.gather(1, order_want))
    expected = torch.zeros_like(counts)
    count_experts(expected, want.ids, rows != 0)
    assert torch.equal(counts, expected), config


def check_router_ties(device: str, config: RouterConfig, tokens: int = 5) -> None:
    """Logits with many equal values: the lowest ids win the ties and the slots come best first (torch.topk
    leaves the order of ties unspecified, so the reference is a stable sort); the weights as the torch router's."""
    from sgl_ray.layers.moe.triton_router import topk_router

    g = torch.Generator().manual_seed(7)
    logits = torch.randint(0, 3, (tokens, config.num_experts), generator=g).float()
    want_ids = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, : config.top_k]
    got = topk_router(logits.to(device), config)
    assert torch.equal(got.ids.cpu().long(), want_ids), config
    want = select_experts(logits, config, None)  # the same values win, whichever ids torch picked
    torch.testing.assert_close(got.weights.cpu(), want.weights)


def check_gate_router(device: str, config: RouterConfig, dtype: torch.dtype = torch.float32) -> None:
    """The router's GEMV and top-k in one launch (one row), plain and with the RMSNorm before it as a scale of the
    product (sums of squares by parts in), with a gate bias, against ``F.linear`` then ``select_experts``; its
    counter is zero again after each launch."""
    from sgl_ray.layers.moe.triton_router import gate_topk_router
    from sgl_ray.layers.triton_gemv_epilogues import NormOfInput

    e, hidden = config.num_experts, 200
    g = torch.Generator().manual_seed(e + config.top_k)
    weight = (torch.randn(e, hidden, generator=g) / hidden**0.5).to(device, dtype)
    gate_bias = (torch.randn(e, generator=g) * 0.1).to(device, dtype) if config.softmax_after_topk else None
    bias = (torch.randn(e, generator=g) * 0.1).to(device) if config.correction_bias else None
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    scale = (1 + 0.3 * torch.randn(hidden, generator=g)).to(device, dtype)
    for normed, scaled in ((False, False), (True, False), (True, True)):
        x = (torch.randn(1, hidden, generator=g) * 3).to(device, dtype)
        sq = x.float().pow(2)
        parts = torch.stack([sq[:, :72].sum(1), sq[:, 72:].sum(1)], dim=1).contiguous()
        norm = NormOfInput(parts, 1e-6, scale if scaled else None) if normed else None
        inp = x.float() * torch.rsqrt(sq.mean(1, keepdim=True) + 1e-6) if normed else x.float()
        if scaled:
            inp = inp * scale.float()
        logits = torch.nn.functional.linear(inp, weight.float())
        if gate_bias is not None:
            logits = logits + gate_bias.float()
        want = select_experts(logits.to(dtype).float(), config, bias)
        counts = torch.zeros(e, dtype=torch.int64, device=device)
        got = gate_topk_router(x, weight, gate_bias, config, counter, norm, bias, counts)
        assert int(counter.item()) == 0, "the counter is left zero for the next launch"
        assert torch.equal(got.ids.sort(1).values, want.ids.sort(1).values), config
        order_got, order_want = got.ids.long().argsort(1), want.ids.long().argsort(1)
        torch.testing.assert_close(got.weights.gather(1, order_got), want.weights.gather(1, order_want))
        expected = torch.zeros_like(counts)
        count_experts(expected, want.ids, None)
        assert torch.equal(counts, expected), config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_router_matches_torch(config):
    check_router("cuda", config, tokens=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_and_topk_in_one_launch(config, dtype):
    check_gate_router("cuda", config, dtype)
