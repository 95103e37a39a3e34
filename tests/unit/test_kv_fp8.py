"""The FP8 KV cache's pieces without a model: quantizing writes and what reads mean, the pool's store, checkpoint
scale names, the ``kv_cache_dtype`` option and its errors, and the pool's sizing (one byte per value)."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import DeepseekV2Config, LlamaConfig

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from sgl_ray.mem_cache.kv_pool import KVPool, KVScale, dequantize_kv, quantize_kv
from sgl_ray.mem_cache.kv_scales import CheckpointKVScales, kv_scale_of
from sgl_ray.runner.memory import kv_cache_dtype, plan_kv_capacity

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# Round to nearest: half a unit in the last place of 3 (e4m3) or 2 (e5m2) mantissa bits relative to a normal value,
# half the smallest subnormal (2^-9, 2^-16) below the normal range (2^-6, 2^-14), before the scale.
REL = {E4M3: 2.0**-4, E5M2: 2.0**-3}
ABS = {E4M3: 2.0**-10, E5M2: 2.0**-17}


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.05, 3.7])
def test_round_trip_within_the_format_tolerance(dtype, scale):
    g = torch.Generator().manual_seed(0)
    # normal-range values, ones deep in the subnormals, and ones past the largest finite value (saturated)
    x = torch.cat([torch.randn(4096, generator=g) * 20, torch.randn(256, generator=g) * 1e-4]) * scale
    limit = torch.finfo(dtype).max * scale
    x = torch.cat([x, torch.tensor([2 * limit, -3 * limit, limit])])
    back = dequantize_kv(quantize_kv(x, scale, dtype), scale)
    expected = x.clamp(-limit, limit)
    err = (back - expected).abs()
    assert bool((err <= REL[dtype] * expected.abs() + ABS[dtype] * scale + 1e-12).all()), float(err.max())
    assert back[-3:].tolist() == pytest.approx([limit, -limit, limit])  # saturated, not inf or NaN
    assert (back[:4096] != x[:4096]).float().mean() > 0.9  # it is rounded: the test tolerance is not vacuous
    # the reference quantization of torch (float32 -> fp8, round to nearest even) after the division
    assert torch.equal(
        quantize_kv(x, scale, dtype).view(torch.uint8),
        (x / scale).clamp(-limit / scale, limit / scale).to(dtype).view(torch.uint8),
    )
    assert torch.isnan(dequantize_kv(quantize_kv(torch.tensor([float("nan")]), scale, dtype), scale)).all()


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_pool_stores_quantized_values_at_their_slots(dtype):
    """``set_kv`` on shuffled slots of one layer of an FP8 pool with scales: the stored bytes are the quantized
    values, every other slot and layer keeps its bytes; a read means stored times the layer's scales."""
    g = torch.Generator().manual_seed(1)
    scales = [KVScale(), KVScale(0.25, 4.0)]
    pool = KVPool(40, 2, 2, 8, dtype, torch.device("cpu"), scales)
    assert pool.is_fp8 and pool.nbytes == 2 * 2 * 40 * 2 * 8  # one byte per value
    assert all(bool((b[0].float() == 0).all()) for b in pool.k_buffers + pool.v_buffers)  # the reserved slot
    before = [b.view(torch.uint8).clone() for b in pool.k_buffers + pool.v_buffers]
    loc = torch.randperm(39, generator=g)[:11] + 1
    k, v = torch.randn(11, 2, 8, generator=g), torch.randn(11, 2, 8, generator=g) * 30
    pool.set_kv(1, loc, k.to(torch.bfloat16), v)  # any float dtype in
    k_buf, v_buf = pool.get_kv(1)
    assert k_buf.dtype == v_buf.dtype == dtype
    assert torch.equal(
        k_buf[loc].view(torch.uint8), quantize_kv(k.to(torch.bfloat16), 0.25, dtype).view(torch.uint8)
    )
    assert torch.equal(v_buf[loc].view(torch.uint8), quantize_kv(v, 4.0, dtype).view(torch.uint8))
    torch.testing.assert_close(dequantize_kv(v_buf[loc], pool.scales[1].v), v, rtol=REL[dtype], atol=1e-3)
    before[1][loc] = k_buf[loc].view(torch.uint8)  # the layer's K buffer: only `loc` changed
    before[3][loc] = v_buf[loc].view(torch.uint8)
    for got, want in zip(pool.k_buffers + pool.v_buffers, before, strict=True):
        assert torch.equal(got.view(torch.uint8), want)


def test_pool_of_the_model_dtype_ignores_scales():
    pool = KVPool(8, 2, 1, 4, torch.float32, torch.device("cpu"), [KVScale(0.5, 0.5)] * 2)
    assert not pool.is_fp8 and pool.scales == [KVScale(1.0, 1.0)] * 2
    x = torch.randn(3, 1, 4)
    pool.set_kv(0, torch.tensor([1, 2, 3]), x, x)
    assert torch.equal(pool.get_kv(0)[0][1:4], x)
    with pytest.raises(ValueError, match="positive"):
        KVPool(8, 1, 1, 4, E4M3, torch.device("cpu"), [KVScale(0.0, 1.0)])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.3.self_attn.k_scale", (3, "k")),  # compressed-tensors / llm-compressor
        ("model.layers.3.self_attn.v_scale", (3, "v")),
        ("model.layers.12.self_attn.attn.k_scale", (12, "k")),  # vLLM's parameter names
        ("model.layers.0.self_attn.k_proj.k_scale", (0, "k")),  # ModelOpt
        ("model.layers.0.self_attn.v_proj.v_scale", (0, "v")),
        ("model.layers.7.self_attn.k_proj.output_scale", (7, "k")),  # older compressed-tensors, Quark
        ("model.layers.7.self_attn.v_proj.output_scale", (7, "v")),
        ("model.layers.2.self_attn.kv_scale", (2, "kv")),  # deprecated: both
        ("language_model.model.layers.5.self_attn.k_scale", (5, "k")),
        ("model.layers.3.self_attn.k_proj.weight_scale", None),  # FP8 weights' scales are not the cache's
        ("model.layers.3.self_attn.k_proj.input_scale", None),
        ("model.layers.3.self_attn.q_proj.output_scale", None),
        ("model.layers.3.self_attn.q_scale", None),
        ("model.norm.k_scale", None),  # not a decoder layer's
    ],
)
def test_checkpoint_scale_names(name, expected):
    assert kv_scale_of(name) == expected


def test_scales_are_taken_out_of_the_weight_stream():
    scales = CheckpointKVScales()
    weights = [
        ("model.layers.0.self_attn.k_scale", torch.tensor(0.5)),
        ("model.layers.0.self_attn.v_scale", torch.tensor([0.25])),
        ("model.layers.0.self_attn.q_proj.weight", torch.ones(2, 2)),
        ("model.layers.1.self_attn.kv_scale", torch.tensor(2.0)),
        ("model.layers.3.self_attn.k_proj.output_scale", torch.tensor([0.1, 0.3])),  # per head: the largest
    ]
    assert [n for n, _ in scales.collect(weights)] == ["model.layers.0.self_attn.q_proj.weight"]
    assert scales
    assert scales.for_layers(range(4)) == [
        KVScale(0.5, 0.25),
        KVScale(2.0, 2.0),
        KVScale(1.0, 1.0),  # a layer without: 1.0
        KVScale(pytest.approx(0.3), 1.0),
    ]
    assert scales.for_layers(range(2, 4))[1].k == pytest.approx(
        0.3
    )  # a pipeline stage's layers, by global index
    for bad in (torch.tensor(0.0), torch.tensor(float("inf")), torch.tensor([])):
        with pytest.raises(ModelLoadError) as info:
            list(CheckpointKVScales().collect([("model.layers.0.self_attn.k_scale", bad)]))
        assert info.value.param == "kv_cache_dtype"


def test_option_values_and_unknown_value_error():
    assert EngineArgs().kv_cache_dtype == "auto"
    assert EngineArgs().kv_cache_torch_dtype(torch.bfloat16) == torch.bfloat16
    assert EngineArgs(kv_cache_dtype="fp8_e4m3").kv_cache_torch_dtype(torch.bfloat16) == E4M3
    assert EngineArgs(kv_cache_dtype="fp8_e5m2").kv_cache_torch_dtype(torch.float32) == E5M2
    for bad in ("fp8", "int8", "FP8_E4M3"):
        with pytest.raises(InvalidRequestError, match="kv_cache_dtype: unknown value") as info:
            EngineArgs(kv_cache_dtype=bad)
        assert info.value.param == "kv_cache_dtype"
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(["--kv-cache-dtype", "fp8_e4m3"])
    assert EngineArgs.from_cli_args(ns).kv_cache_dtype == "fp8_e4m3"


def _llama(dtype: torch.dtype) -> ModelConfig:
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)
    return ModelConfig(cfg, dtype)


def test_fp8_pool_holds_twice_the_tokens_of_a_16_bit_one():
    """One byte per value: ``kv_bytes_per_token`` halves from bf16 (quarters from fp32), and the same memory budget
    plans twice the slots."""
    bf16 = _llama(torch.bfloat16)
    assert bf16.kv_bytes_per_token(kv_dtype=E4M3) * 2 == bf16.kv_bytes_per_token() == 2 * 3 * 4 * 32 * 2
    assert bf16.kv_bytes_per_token(2, E5M2) * 2 == bf16.kv_bytes_per_token(2)
    assert (
        _llama(torch.float32).kv_bytes_per_token(kv_dtype=E4M3) * 4
        == _llama(torch.float32).kv_bytes_per_token()
    )
    cpu = torch.device("cpu")
    budget = dict(mem_fraction_static=1e-5, page_size=1)
    auto = plan_kv_capacity(EngineArgs(**budget), bf16, cpu)
    fp8 = plan_kv_capacity(EngineArgs(**budget, kv_cache_dtype="fp8_e4m3"), bf16, cpu)
    tokens_auto, tokens_fp8 = auto.num_slots - 1, fp8.num_slots - 1  # the reserved page of one slot
    assert tokens_auto > 100 and tokens_fp8 in (2 * tokens_auto, 2 * tokens_auto + 1)
    # max_total_tokens is a token count: the same for both
    given = dict(max_total_tokens=500)
    assert plan_kv_capacity(EngineArgs(**given, kv_cache_dtype="fp8_e4m3"), bf16, cpu).num_slots == 501


def test_mla_latent_pool_refuses_fp8_at_start():
    mla = ModelConfig(
        DeepseekV2Config(kv_lora_rank=64, qk_rope_head_dim=16, num_hidden_layers=2), torch.float32
    )
    assert kv_cache_dtype(EngineArgs(), mla) == torch.float32
    for args in (
        EngineArgs(kv_cache_dtype="fp8_e4m3"),
        EngineArgs(kv_cache_dtype="fp8_e5m2", max_total_tokens=64),
    ):
        with pytest.raises(UnsupportedModelError, match="kv_cache_dtype='fp8_e.*latent") as info:
            plan_kv_capacity(args, mla, torch.device("cpu"))
        assert info.value.param == "kv_cache_dtype"
