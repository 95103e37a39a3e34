"""DeepSeek-V2 / V2-Lite / V3 (MLA attention, DeepSeek's MoE) in-process on CPU (fp32): greedy tokens equal
transformers' on tiny random weights, over concurrent mixed-length requests in 16-token prefill chunks, prefix-cache
hits, and preemption with recomputation; the KV pool holds one latent per token; a checkpoint's
multi-token-prediction layer is skipped and recorded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV2Config, DeepseekV3Config, PretrainedConfig

import sgl_ray
from sgl_ray.mem_cache.kv_pool import MLAKVPool

from ..conftest import GreedyReference, _hf_model, save_tiny_model
from .prompts import PROMPTS
from .test_moe_greedy import GREEDY, check_exact, token_lists

_SHAPE = dict(
    hidden_size=64,
    num_attention_heads=4,
    vocab_size=49152,  # SmolLM2's tokenizer
    max_position_embeddings=8192,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    initializer_range=0.2,  # peaked logits and router scores: greedy and top-k are not decided by rounding
    tie_word_embeddings=False,
    num_hidden_layers=2,
    first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=24,  # unlike the q/k head dim (24), as in the real models (128 vs 192)
)


def deepseek_config(name: str) -> PretrainedConfig:
    """V2: q LoRA, softmax routing over the best 2 of 4 groups, 2 shared experts, YaRN with mscale (the softmax
    scale too); V2-Lite: one q_proj, plain top-k; V3: q LoRA, sigmoid scores with the correction bias, grouped by
    their best two, renormalized, pair-interleaved rotary; V3 with ``rope_interleave=False``: rotary on halves."""
    if name == "v2":
        yarn = {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
            "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 2048,
        }  # fmt: skip
        return DeepseekV2Config(
            **_SHAPE, q_lora_rank=48, n_shared_experts=2, topk_method="group_limited_greedy", n_group=4,
            topk_group=2, routed_scaling_factor=1.5, rope_parameters=yarn,
        )  # fmt: skip
    if name == "v2_lite":
        return DeepseekV2Config(**_SHAPE, q_lora_rank=None, n_shared_experts=1)
    if name in ("v3", "v3_halves"):
        return DeepseekV3Config(
            **_SHAPE, q_lora_rank=48, n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True,
            rope_interleave=name == "v3",
        )  # fmt: skip
    raise KeyError(name)


MODELS = ("v2", "v2_lite", "v3", "v3_halves")


def add_mtp_layer(directory: str, config: PretrainedConfig) -> None:
    """Append the tensors of a multi-token-prediction layer (``model.layers.{num_hidden_layers}``: its own
    projections and norms, an attention block and experts) to the checkpoint, as DeepSeek-V3's carries one."""
    path = f"{directory}/model.safetensors"
    tensors = load_file(path)
    h, mtp, last = config.hidden_size, f"model.layers.{config.num_hidden_layers}", "model.layers.1"
    tensors |= {
        f"{mtp}.enorm.weight": torch.ones(h),
        f"{mtp}.hnorm.weight": torch.ones(h),
        f"{mtp}.eh_proj.weight": torch.zeros(h, 2 * h),
        f"{mtp}.shared_head.norm.weight": torch.ones(h),
        f"{mtp}.self_attn.kv_b_proj.weight": tensors[f"{last}.self_attn.kv_b_proj.weight"].clone(),
        f"{mtp}.mlp.experts.0.gate_proj.weight": tensors[f"{last}.mlp.experts.0.gate_proj.weight"].clone(),
    }
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory, smollm2_path):
    """``deepseek(name)`` -> (model directory, transformers reference), built on first use."""
    built: dict[str, tuple[str, GreedyReference]] = {}

    def get(name: str) -> tuple[str, GreedyReference]:
        if name not in built:
            config = deepseek_config(name)
            path = save_tiny_model(config, tmp_path_factory.mktemp(name), smollm2_path)
            reference = GreedyReference(_hf_model(path))  # before the MTP tensors, which transformers lacks
            if name == "v3":
                add_mtp_layer(path, config)
            built[name] = path, reference
        return built[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_greedy_matches_transformers(name, deepseek):
    path, reference = deepseek(name)
    config = deepseek_config(name)
    with sgl_ray.Engine(path, chunked_prefill_size=16, max_total_tokens=4096) as engine:
        runner = engine._core.runner
        latent = config.kv_lora_rank + config.qk_rope_head_dim
        assert isinstance(runner.kv_pool, MLAKVPool) and runner.kv_pool.head_dim == latent
        assert runner.config.kv_bytes_per_token() == config.num_hidden_layers * latent * 4  # fp32
        assert type(runner.attn_backend).__name__ == "TorchMLABackend"
        lists = token_lists(engine.tokenizer)
        check_exact(engine, reference, lists)
        again = check_exact(engine, reference, lists[-2:])  # the shared few-shot prefix is cached now
        assert all(o["meta_info"]["cached_tokens"] >= len(lists[-1]) // 2 for o in again)
        load = engine.get_stats()["expert_tokens"]
        assert list(load) == ["1"]  # layer 0 is dense (first_k_dense_replace)
        assert sum(c > 0 for c in load["1"]) >= 2
        assert runner.model.mtp_layers == ({config.num_hidden_layers} if name == "v3" else set())


def test_preemption_and_pages_keep_outputs_exact(deepseek):
    """Requests preempted under KV pressure and recomputed over their cached latents, on 4-token pages, give
    transformers' tokens."""
    path, reference = deepseek("v3")
    new = 24
    with sgl_ray.Engine(path, max_total_tokens=128, chunked_prefill_size=32, page_size=4) as engine:
        lists = [ids for ids in (engine.tokenizer.encode(p) for p in PROMPTS[:10]) if len(ids) < 40]
        outs = engine.generate(input_ids=lists, sampling_params={**GREEDY, "max_new_tokens": new})
        for ids, out in zip(lists, outs, strict=True):
            assert out["output_ids"] == reference(ids, new), f"mismatch for a {len(ids)}-token prompt"
        stats = engine.get_stats()
        assert stats["num_preemptions"] > 0
