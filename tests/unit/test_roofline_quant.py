"""Roofline floors of quantized weights and an FP8 KV cache: bytes per weight as the engine holds each format."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from sgl_ray.bench.roofline import DeviceRates, ModelCost, decode_floor_tok_s, max_batch_for
from sgl_ray.configs.model_config import ModelConfig

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
H, INTER, KV, V, LAYERS = 4096, 14336, 1024, 128256, 32
# [out, in] of one layer's projections: q, k, v, o, gate, up, down
SHAPES = [(H, H), (KV, H), (KV, H), (H, H), (INTER, H), (INTER, H), (H, INTER)]
PROJ = LAYERS * sum(n * k for n, k in SHAPES)
LM_HEAD_BF16 = 2 * H * V


def _config(quantization_config: dict | None = None) -> ModelConfig:
    config = LlamaConfig(**LLAMA_8B)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    return ModelConfig(config, torch.bfloat16)


def test_bf16_counts_two_bytes_per_weight_and_names_the_format():
    cost = ModelCost.from_config(_config())
    assert cost.weight_bytes == 2 * PROJ + LM_HEAD_BF16
    assert cost.weight_format == "bfloat16"
    assert dict(cost.held_bytes) == {"float": 2 * PROJ, "lm_head": LM_HEAD_BF16}


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_is_half_a_byte_plus_scale_and_zero_per_group_and_the_lm_head_stays_bf16(method):
    cost = ModelCost.from_config(_config(), method)
    groups = LAYERS * sum(n * (k // 128) for n, k in SHAPES)
    assert cost.weight_bytes == PROJ / 2 + 3 * groups + LM_HEAD_BF16
    assert cost.weight_format == f"{method.upper()} + bfloat16"
    assert cost.matmul_params == ModelCost.from_config(_config()).matmul_params  # FLOPs do not change
    # a checkpoint's own group size wins over the load-time default
    g32 = ModelCost.from_config(_config({"quant_method": method, "bits": 4, "group_size": 32}), method)
    assert g32.weight_bytes == PROJ / 2 + 3 * groups * 4 + LM_HEAD_BF16


def test_fp8_is_a_byte_plus_a_float32_scale_per_row_or_per_row_and_block():
    rows = LAYERS * sum(n for n, _ in SHAPES)
    online = ModelCost.from_config(_config(), "fp8")
    assert online.weight_bytes == PROJ + 4 * rows + LM_HEAD_BF16
    blocks = ModelCost.from_config(_config({"quant_method": "fp8", "weight_block_size": [128, 128]}), "fp8")
    assert (
        blocks.weight_bytes == PROJ + 4 * LAYERS * sum(n * (-(-k // 128)) for n, k in SHAPES) + LM_HEAD_BF16
    )


def test_quantized_bs1_floors_against_bf16():
    ctx = 128 + 256 / 2
    floors = {
        q: decode_floor_tok_s(ModelCost.from_config(_config(), q), H100ISH, 1, ctx)
        for q in (None, "fp8", "awq")
    }
    # batch 1 is bound by bytes: FP8 under 2x bf16 (the 1 GB LM head stays bf16), INT4 more than 3x
    assert 1.8 < floors["fp8"] / floors[None] < 1.9
    assert floors["awq"] / floors[None] > 3.0
    assert 360 < floors["fp8"] < 385  # 8.0 GB read per step at 3.0 TB/s


def test_fp8_kv_cache_halves_kv_bytes_and_doubles_what_a_pool_holds():
    bf16 = ModelCost.from_config(_config())
    fp8 = ModelCost.from_config(_config(), kv_dtype=torch.float8_e4m3fn)
    assert bf16.kv_bytes_per_token == 2 * LAYERS * KV * 2
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token / 2
    assert fp8.weight_bytes == bf16.weight_bytes
    # the same memory holds twice the tokens: twice the requests of a long workload fit at once
    memory = 40e9
    slots = {c: int(memory // c.kv_bytes_per_token) for c in (bf16, fp8)}
    assert max_batch_for(slots[fp8], 10_000, 1024, 1024) == 2 * max_batch_for(slots[bf16], 10_000, 1024, 1024)
    # a decode step at a long context reads fewer bytes: a higher floor
    assert decode_floor_tok_s(fp8, H100ISH, 64, 4096) > 1.5 * decode_floor_tok_s(bf16, H100ISH, 64, 4096)
