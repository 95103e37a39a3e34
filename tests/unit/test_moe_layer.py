"""The MoE layer's parts on their own: routers against transformers' routers, the torch experts against a per-token
loop, expert placement and loading (per-expert and fused checkpoint layouts, expert-parallel slices, missing
experts), the weight filter that keeps other ranks' experts unread, and the start-up checks."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    Qwen3MoeConfig,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.errors import InvalidRequestError, ModelLoadError
from sgl_ray.layers.moe.base import Activation, ExpertWeights, TopK, create_moe_backend
from sgl_ray.layers.moe.experts import ExpertPlacement, FusedExperts, expert_weight_target
from sgl_ray.layers.moe.router import RouterConfig, select_experts
from sgl_ray.layers.moe.torch_backend import TorchMoEBackend
from sgl_ray.models.qwen_moe import Qwen3MoeForCausalLM

from .ranks import RankOf

H, E = 32, 16


def _same_choice(ours: TopK, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Same experts per token (in any order) with the same weight each."""
    order_a, order_b = ours.ids.long().argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(ours.ids.long().gather(1, order_a), ids.gather(1, order_b))
    torch.testing.assert_close(ours.weights.gather(1, order_a), weights.float().gather(1, order_b))


def _hf_router(cls, config, bias: bool = False):
    torch.manual_seed(0)
    router = cls(config)
    with torch.no_grad():
        router.weight.normal_(0, 1)
        if bias and getattr(router, "bias", None) is not None:
            router.bias.normal_(0, 1)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.normal_(0, 0.1)
    return router


@pytest.mark.parametrize(
    ("cls", "config", "ours"),
    [
        (Qwen3MoeTopKRouter, Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=4, norm_topk_prob=True),
         RouterConfig(E, 4)),
        (Qwen3MoeTopKRouter, Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=4, norm_topk_prob=False),
         RouterConfig(E, 4, renormalize=False)),
        (MixtralTopKRouter, MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=2),
         RouterConfig(E, 2)),
        (GptOssTopKRouter, GptOssConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=4),
         RouterConfig(E, 4, softmax_after_topk=True)),
        (DeepseekV2TopkRouter,
         DeepseekV2Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=3, topk_method="group_limited_greedy",
                          n_group=4, topk_group=2, routed_scaling_factor=2.5),
         RouterConfig(E, 3, renormalize=False, num_expert_group=4, topk_group=2, routed_scaling_factor=2.5)),
        (DeepseekV3TopkRouter,
         DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=4, n_group=4, topk_group=2,
                          routed_scaling_factor=2.5, norm_topk_prob=True),
         RouterConfig(E, 4, scoring="sigmoid", num_expert_group=4, topk_group=2, group_score="top2_sum",
                      routed_scaling_factor=2.5, correction_bias=True)),
    ],
)  # fmt: skip
def test_router_matches_transformers(cls, config, ours):
    router = _hf_router(cls, config, bias=True)
    x = torch.randn(40, H)
    _, weights, ids = router(x)
    bias = getattr(router, "bias", None)
    logits = torch.nn.functional.linear(x, router.weight, bias)
    _same_choice(select_experts(logits, ours, getattr(router, "e_score_correction_bias", None)), ids, weights)


def test_router_config_is_checked():
    with pytest.raises(ValueError, match="top_k"):
        RouterConfig(4, 5)
    with pytest.raises(ValueError, match="go together"):
        RouterConfig(8, 2, num_expert_group=4)
    with pytest.raises(ValueError, match="divide"):
        RouterConfig(8, 2, num_expert_group=3, topk_group=1)


def _experts(e: int, i: int, bias: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(e, 2 * i, H, generator=g) / 4, torch.randn(e, H, i, generator=g) / 4
    b13 = torch.randn(e, 2 * i, generator=g) if bias else None
    b2 = torch.randn(e, H, generator=g) if bias else None
    return w13, w2, b13, b2


def _per_token(x, w13, w2, b13, b2, act, topk, first) -> torch.Tensor:
    """The definition, one (token, expert) pair at a time."""
    out = torch.zeros_like(x)
    i = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(topk.ids.shape[1]):
            e = int(topk.ids[t, j]) - first
            if not 0 <= e < w13.shape[0]:
                continue
            h = w13[e] @ x[t] + (b13[e] if b13 is not None else 0)
            y = w2[e] @ act(h[:i], h[i:]) + (b2[e] if b2 is not None else 0)
            out[t] += topk.weights[t, j] * y
    return out


@pytest.mark.parametrize("act", [Activation(), Activation("swigluoai", 1.702, 2.0)])
@pytest.mark.parametrize(("first", "local"), [(0, E), (4, 4)])  # all experts; an expert-parallel slice
def test_torch_experts_match_the_definition(act, first, local):
    w13, w2, b13, b2 = _experts(E, 8, bias=act.kind == "swigluoai")
    x = torch.randn(13, H)
    ids = torch.randint(0, E, (13, 3), dtype=torch.int32)
    ids[0] = torch.tensor([first, first, first])  # one expert takes every pair of a token
    ids[1, 0] = -1  # no expert
    topk = TopK(torch.rand(13, 3), ids)
    sl = slice(first, first + local)
    weights = ExpertWeights(
        w13[sl], w2[sl], None if b13 is None else b13[sl], None if b2 is None else b2[sl], act
    )
    counts = torch.zeros(E, dtype=torch.int64)
    mask = torch.ones(13, dtype=torch.bool)
    mask[5] = False
    out = TorchMoEBackend().run_experts(x, weights, topk, first, counts=counts, count_mask=mask)
    want = _per_token(x, *weights[:4], act, topk, first)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    kept = ids[mask].reshape(-1)
    assert torch.equal(counts, torch.bincount(kept[kept >= 0].long(), minlength=E))


def test_backend_registry():
    assert type(create_moe_backend("auto", torch.device("cpu"))) is TorchMoEBackend
    with pytest.raises(InvalidRequestError, match="needs a CUDA device"):
        create_moe_backend("triton", torch.device("cpu"))
    with pytest.raises(InvalidRequestError, match="unknown backend"):
        create_moe_backend("cutlass", torch.device("cpu"))


def test_expert_placement_follows_sglang():
    # tp 4, ep 2: ranks 0-1 hold experts 0-3 (intermediate halves), ranks 2-3 experts 4-7
    got = [ExpertPlacement.of(8, r, 4, 2) for r in range(4)]
    assert [(p.first_expert, p.moe_tp_rank, p.moe_tp_size) for p in got] == [
        (0, 0, 2),
        (0, 1, 2),
        (4, 0, 2),
        (4, 1, 2),
    ]
    with pytest.raises(ValueError, match="must divide the number of experts"):
        ExpertPlacement.of(6, 0, 4, 4)


def test_expert_weight_names():
    assert expert_weight_target("model.layers.2.mlp.experts.7.up_proj.weight") == (
        "model.layers.2.mlp.experts.w13",
        (7, "up"),
    )
    assert expert_weight_target("model.layers.2.mlp.experts.7.w2.weight") == (
        "model.layers.2.mlp.experts.w2",
        (7, "down"),
    )
    assert expert_weight_target("model.layers.0.mlp.experts.gate_up_proj_bias") == (
        "model.layers.0.mlp.experts.b13",
        (None, "fused"),
    )
    assert expert_weight_target("model.layers.0.mlp.shared_experts.gate_proj.weight") is None
    assert expert_weight_target("model.layers.0.mlp.gate.weight") is None


def _load_per_expert(module: FusedExperts, w13, w2) -> None:
    i = w2.shape[2]
    for e in range(w13.shape[0]):
        module.weight_loader(module.w13, w13[e, :i], (e, "gate"))
        module.weight_loader(module.w13, w13[e, i:], (e, "up"))
        module.weight_loader(module.w2, w2[e], (e, "down"))


@pytest.mark.parametrize(("rank", "tp", "ep"), [(1, 2, 2), (1, 2, 1), (3, 4, 2)])
def test_per_expert_checkpoint_is_sliced_for_each_rank(rank, tp, ep):
    w13, w2, _, _ = _experts(8, 12, bias=False)
    p = ExpertPlacement.of(8, rank, tp, ep)
    module = FusedExperts(H, 12, p)
    _load_per_expert(module, w13, w2)
    module.check_loaded("experts")
    n, i = p.num_local_experts, 12 // p.moe_tp_size
    sl, cols = slice(p.first_expert, p.first_expert + n), slice(p.moe_tp_rank * i, (p.moe_tp_rank + 1) * i)
    assert torch.equal(module.w13[:, :i], w13[sl, :12][:, cols])
    assert torch.equal(module.w13[:, i:], w13[sl, 12:][:, cols])
    assert torch.equal(module.w2, w2[sl][:, :, cols])


def test_a_missing_expert_is_named():
    module = FusedExperts(H, 12, ExpertPlacement.of(8, 0, 1, 1))
    w13, w2, _, _ = _experts(8, 12, bias=False)
    _load_per_expert(module, w13, w2)
    module._loaded.discard(("w2", 5, "down"))
    with pytest.raises(ModelLoadError, match=r"experts\.5\.down"):
        module.check_loaded("experts")


@pytest.mark.parametrize(("rank", "tp", "ep"), [(0, 1, 1), (1, 2, 1), (1, 2, 2)])
def test_fused_gpt_oss_layout(rank, tp, ep):
    """``gate_up_proj`` [E, H, 2I] interleaved, input-major: each rank's slice computes the same experts as the
    checkpoint (partial sums over the ranks add up, the down bias counted once)."""
    e, i = 4, 12
    g = torch.Generator().manual_seed(1)
    gate_up, gate_up_b = torch.randn(e, H, 2 * i, generator=g), torch.randn(e, 2 * i, generator=g)
    down, down_b = torch.randn(e, i, H, generator=g), torch.randn(e, H, generator=g)
    act = Activation("swigluoai", 1.702, 7.0)
    x = torch.randn(5, H)
    topk = TopK(torch.rand(5, 2), torch.randint(0, e, (5, 2), dtype=torch.int32))
    total = torch.zeros(5, H)
    for r in range(tp):
        module = FusedExperts(H, i, ExpertPlacement.of(e, r, tp, ep), act, bias=True)
        for param, tensor in (
            (module.w13, gate_up),
            (module.b13, gate_up_b),
            (module.w2, down),
            (module.b2, down_b),
        ):
            module.weight_loader(param, tensor, (None, "fused"))
        module.check_loaded("experts")
        total += TorchMoEBackend().run_experts(x, module.weights(), topk, module.placement.first_expert)
    # the definition on the checkpoint's own layout (HF GptOssExperts)
    want = torch.zeros(5, H)
    for t in range(5):
        for j in range(2):
            ex = int(topk.ids[t, j])
            h = x[t] @ gate_up[ex] + gate_up_b[ex]
            y = act(h[0::2], h[1::2]) @ down[ex] + down_b[ex]
            want[t] += topk.weights[t, j] * y
    torch.testing.assert_close(total, want, atol=1e-4, rtol=1e-4)


def test_expert_parallel_rank_reads_only_its_experts():
    from ..moe_models import moe_config

    config = ModelConfig(moe_config("qwen3_moe"), torch.float32)
    model = Qwen3MoeForCausalLM(config, ShardContext(tp=RankOf(1, 2), ep_size=2))
    names = [
        f"model.layers.0.mlp.experts.{e}.{p}.weight"
        for e in range(8)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    read = [n for n in names if model.wants_weight(n)]
    assert {n.split(".")[5] for n in read} == {"4", "5", "6", "7"}
    assert model.wants_weight("model.layers.0.mlp.gate.weight")
    assert model.wants_weight("model.layers.1.mlp.gate_proj.weight")  # the dense layer
    expert_bytes = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert expert_bytes == 2 * 4 * 3 * 32 * 64  # two sparse layers, 4 of 8 experts, 3 matrices of 32 x 64


def test_check_parallel_names_what_does_not_fit():
    dense = ModelConfig(
        Qwen3MoeConfig(num_experts=0, num_attention_heads=4, num_key_value_heads=2), torch.float32
    )
    with pytest.raises(InvalidRequestError, match="not an MoE model"):
        dense.check_parallel(2, 2)

    def moe(inter: int) -> ModelConfig:
        hf = Qwen3MoeConfig(
            num_experts=8, moe_intermediate_size=inter, num_attention_heads=8, num_key_value_heads=2
        )
        return ModelConfig(hf, torch.float32)

    moe(32).check_parallel(8, 2)  # 8 experts over 2 groups of 4 ranks, each expert's 32 split 4 ways
    moe(30).check_parallel(8, 8)  # one rank per group: nothing to split
    with pytest.raises(InvalidRequestError, match="not divisible by tp_size / ep_size"):
        moe(30).check_parallel(8, 2)
    with pytest.raises(InvalidRequestError, match="attention heads"):
        moe(32).check_parallel(3)


def test_engine_args_check_the_moe_options():
    from sgl_ray.configs.engine_args import EngineArgs

    with pytest.raises(InvalidRequestError, match="ep_size == tp_size"):
        EngineArgs(tp_size=2, ep_size=1, moe_a2a_backend="all_to_all")
    with pytest.raises(InvalidRequestError, match="must divide tp_size"):
        EngineArgs(tp_size=2, ep_size=4)
    with pytest.raises(InvalidRequestError, match="moe_runner_backend"):
        EngineArgs(moe_runner_backend="cutlass")
    assert EngineArgs(tp_size=4, ep_size=4, moe_a2a_backend="all_to_all").ep_size == 4


def test_metrics_export_the_expert_load():
    from sgl_ray.deployments.metrics import Metrics

    text = Metrics().render({"expert_tokens": {"10": [5, 0], "2": [1, 7]}})
    lines = [line for line in text.splitlines() if line.startswith("sgl_ray_moe_expert_tokens_total{")]
    assert lines == [
        'sgl_ray_moe_expert_tokens_total{layer="2",expert="0"} 1',
        'sgl_ray_moe_expert_tokens_total{layer="2",expert="1"} 7',
        'sgl_ray_moe_expert_tokens_total{layer="10",expert="0"} 5',
        'sgl_ray_moe_expert_tokens_total{layer="10",expert="1"} 0',
    ]
    assert "# TYPE sgl_ray_moe_expert_tokens_total counter" in text
    assert "sgl_ray_moe_expert_tokens_total" not in Metrics().render({})  # dense models: no series
