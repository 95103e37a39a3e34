"""The roofline model (parameter and byte counts against a real model definition), the CUDA-graph batch ladder,
and ``sgl-ray bench roofline`` end to end on a config-only model with random weights."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sgl_ray.bench.roofline import (
    DeviceRates,
    ModelCost,
    decode_floor_tok_s,
    decode_step_s,
    max_batch_for,
    workload_floor_s,
)
from sgl_ray.cli import main
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.runner.cuda_graph import batch_size_ladder

from ..conftest import save_config_only_llama

LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
H100ISH = DeviceRates(copy_bytes_per_s=3.0e12, matmul_flops_per_s=7.9e14)


def test_model_cost_counts_every_matmul_weight_of_llama_8b():
    config = LlamaConfig(**LLAMA_8B)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cost = ModelCost.from_config(ModelConfig(config, torch.bfloat16))
    assert cost.matmul_params == linear
    assert cost.weight_bytes == 2 * linear
    assert cost.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 kv heads of 128, bf16
    # Batch-1 decode is bound by reading the weights once per token: ~15 GB at 3 TB/s is about 5 ms.
    floor = decode_floor_tok_s(cost, H100ISH, batch=1, context=1024)
    assert 190 < floor < 200


def test_moe_cost_counts_the_experts_a_step_touches():
    """Qwen3-MoE with a dense layer and Qwen2-MoE's shared experts against the real modules' weights: all of them
    are held, a token multiplies the dense part and its top-k experts, and a bs1 step reads k experts per layer."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, num_hidden_layers=3
    )
    for hf_cls, config in (
        (Qwen3MoeForCausalLM, Qwen3MoeConfig(**shape, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                             num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1])),
        (Qwen2MoeForCausalLM, Qwen2MoeConfig(**shape, intermediate_size=96, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2)),
    ):  # fmt: skip
        with torch.device("meta"):
            model = hf_cls(config)
        params = dict(model.named_parameters())
        # (the roofline leaves out vectors: norms, biases, Qwen2-MoE's one-row shared-expert gate)
        skip = ("norm", "embed_tokens", ".bias", "shared_expert_gate")
        held = sum(p.numel() for n, p in params.items() if not any(s in n for s in skip))
        experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
        cost = ModelCost.from_config(ModelConfig(config, torch.bfloat16))
        assert cost.total_weight_bytes == 2 * held
        per_expert = experts // 8
        assert cost.step_weight_bytes(1) == 2 * (held - experts + 2 * per_expert)
        assert cost.matmul_params == held - experts + 2 * per_expert
        assert cost.step_weight_bytes(10_000) == pytest.approx(cost.total_weight_bytes)


def test_decode_floor_turns_compute_bound_at_large_batch():
    cost = ModelCost.from_config(ModelConfig(LlamaConfig(**LLAMA_8B), torch.bfloat16))
    small, large = decode_step_s(cost, H100ISH, 1, 512), decode_step_s(cost, H100ISH, 1024, 512)
    assert large > small  # more KV and more FLOPs per step
    flops_bound = 1024 * (2 * cost.matmul_params + cost.attn_flops_per_ctx * 512) / H100ISH.matmul_flops_per_s
    assert large == pytest.approx(max(flops_bound, large))
    # A whole workload: more requests at once amortise the weight reads.
    one = workload_floor_s(cost, H100ISH, 64, 128, 128, max_batch=1)
    many = workload_floor_s(cost, H100ISH, 64, 128, 128, max_batch=64)
    assert many < one / 10
    assert max_batch_for(num_slots=10_000, max_running=256, input_len=900, output_len=100) == 10


def test_batch_size_ladder():
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(16) == [1, 2, 4, 8, 16]
    assert batch_size_ladder(20) == [1, 2, 4, 8, 16, 20]
    ladder = batch_size_ladder(160)
    assert ladder[:6] == [1, 2, 4, 8, 16, 24] and ladder[-1] == 160
    gaps = [b / a for a, b in itertools.pairwise(ladder[3:])]
    assert max(gaps) <= 2.0 and ladder[-3:] == [128, 144, 160]


def test_bench_roofline_cli_on_random_weights(tmp_path, capsys):
    model_dir = save_config_only_llama(tmp_path / "tiny")
    out = tmp_path / "roof.jsonl"
    argv = ["bench", "roofline", "--model-path", model_dir, "--load-format", "dummy"]
    argv += ["--skip-tokenizer-init", "--max-total-tokens", "4096", "--bs1-output-len", "8"]
    argv += ["--offline", "6:32:8", "--shared-prefix", "4:64:8:4", "--hf-batch", "2:16:4"]
    assert main([*argv, "--output-file", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    systems = [(r["workload"], r["system"]) for r in records]
    assert systems == [
        ("bs1 128/8", "sgl_ray"),
        ("offline 6x32/8", "sgl_ray"),
        ("shared-prefix 4x(64+8)/4", "sgl_ray"),
        ("shared-prefix 4x(64+8)/4", "sgl_ray radix off"),
        ("bs1 128/8", "transformers"),
        ("batch 2x16/4", "transformers"),
    ]
    assert records[1]["output_tokens"] == 6 * 8
    assert records[2]["cached_tokens"] >= 3 * 64  # every request after the first reuses the prefix
    assert records[3]["cached_tokens"] is None or records[3]["cached_tokens"] == 0
    assert all(r["kv_token_capacity"] == 4097 for r in records)
    assert 0 < records[0]["fraction"] < 1.5
    assert "| offline 6x32/8 | sgl_ray |" in capsys.readouterr().out
    assert main([*argv[:-6], "--offline", "6:32", "--output-file", str(out)]) == 2


def test_phased_floor_adds_the_gemm_and_attention_phases():
    """The phased floor is never below the plain one; at a large batch and long context it is the sum of a
    compute-bound GEMM phase and a bandwidth-bound attention phase, so clearly above the plain max()."""
    cost = ModelCost(
        matmul_params=7.5e9, weight_bytes=15e9, kv_bytes_per_token=131072, attn_flops_per_ctx=524288
    )
    rates = DeviceRates(copy_bytes_per_s=4.2e12, matmul_flops_per_s=7.9e14)
    for batch, ctx in [(1, 128), (1, 16384), (64, 1024), (256, 1536)]:
        plain, phased = (decode_step_s(cost, rates, batch, ctx, phased=p) for p in (False, True))
        assert phased >= plain * (1 - 1e-12)
    gemm = 256 * 2 * 7.5e9 / 7.9e14  # compute-bound at batch 256
    attn = 256 * 1536 * 131072 / 4.2e12
    assert math.isclose(decode_step_s(cost, rates, 256, 1536, phased=True), gemm + attn)
    assert decode_step_s(cost, rates, 256, 1536, phased=True) > 1.05 * decode_step_s(cost, rates, 256, 1536)
    assert math.isclose(
        decode_step_s(cost, rates, 1, 128, phased=True), decode_step_s(cost, rates, 1, 128), rel_tol=0.01
    )
    # both phases bandwidth-bound (batch 64): the same floor; GEMMs compute-bound (batch 256): a higher one
    at64, at256 = (
        [workload_floor_s(cost, rates, 512, 1024, 1024, b, phased=p) for p in (False, True)]
        for b in (64, 256)
    )
    assert math.isclose(at64[0], at64[1]) and at256[1] > 1.05 * at256[0]
