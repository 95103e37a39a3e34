"""Attention over an FP8 KV pool (``kv_cache_dtype``): the torch, Triton and FlashInfer backends against a dense
fp64 softmax over the values the pool means (stored times the layer's scales).

The cases are those of ``test_triton_attention`` (shuffled slots, NaN in every unwritten slot, strided q/k/v) with
the pool converted to FP8: the written slots quantized with the layer's scales, NaN kept. The reference is
``dense_reference`` on the dequantized pool and on the new tokens' keys and values rounded through FP8 as well,
since every backend reads a query's keys from the pool, this step's included. The helpers also serve the Triton
interpreter test on CPU (``tests/unit/test_kv_fp8_interpreter.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sgl_ray.attention.torch_backend import TorchAttentionBackend
from sgl_ray.mem_cache.kv_pool import KVPool, KVScale, dequantize_kv, quantize_kv

from .backends import HAVE_FLASHINFER
from .test_triton_attention import (
    LAYER_ID,
    TOLERANCE,
    Case,
    dense_reference,
    make_batch,
    make_case,
    nan_buffers,
    split_qkv,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SCALE = KVScale(k=0.37, v=2.5)  # layer LAYER_ID's; the other layer keeps 1.0


def fp8_case(case: Case, kv_dtype: torch.dtype, scale: KVScale = SCALE) -> Case:
    """``case`` with its pool as ``kv_dtype`` values: what ``KVPool.set_kv`` would have stored for it."""
    src = case.pool
    layer = case.layer
    scales = [KVScale()] * len(src.k_buffers)
    scales[LAYER_ID] = scale
    pool = KVPool(
        src.num_slots, len(scales), layer.num_kv_heads, layer.head_dim, kv_dtype, src.device, scales
    )
    for i, s in enumerate(scales):
        pool.k_buffers[i].copy_(quantize_kv(src.k_buffers[i], s.k, kv_dtype))
        pool.v_buffers[i].copy_(quantize_kv(src.v_buffers[i], s.v, kv_dtype))
    return dataclasses.replace(case, pool=pool)


def fp8_reference(case: Case) -> torch.Tensor:
    """The dense fp64 softmax over what the pool means: its stored values times the scales, and the new tokens'
    keys and values rounded as the store rounds them. [T, H * D] fp32."""
    pool, layer = case.pool, case.layer
    scale = pool.scales[LAYER_ID]
    deq = KVPool(pool.num_slots, 2, layer.num_kv_heads, layer.head_dim, torch.float32, pool.device)
    deq.k_buffers = [dequantize_kv(b, s.k) for b, s in zip(pool.k_buffers, pool.scales, strict=True)]
    deq.v_buffers = [dequantize_kv(b, s.v) for b, s in zip(pool.v_buffers, pool.scales, strict=True)]
    q, k, v = split_qkv(case, torch.float32)
    k = dequantize_kv(quantize_kv(k, scale.k, pool.dtype), scale.k)
    v = dequantize_kv(quantize_kv(v, scale.v, pool.dtype), scale.v)
    return dense_reference(dataclasses.replace(case, pool=deq, qkv=torch.cat([q, k, v], dim=1)))


def run_torch(case: Case) -> torch.Tensor:
    backend = TorchAttentionBackend(case.qkv.device)
    return backend.forward(*split_qkv(case), case.layer, make_batch(case, case.pool, backend))


def run_triton(case: Case, num_kv_splits: int | None = None) -> torch.Tensor:
    from sgl_ray.attention.triton_backend import TritonAttentionBackend

    backend = nan_buffers(TritonAttentionBackend(case.qkv.device, num_kv_splits=num_kv_splits))
    return backend.forward(*split_qkv(case), case.layer, make_batch(case, case.pool, backend))


def check_fp8(case: Case, run=run_triton) -> None:
    """``run(case)`` on the FP8 pool against :func:`fp8_reference`; the store wrote exactly the quantized new
    keys and values at ``out_cache_loc`` of the layer and nothing else (compared as bytes: NaN-proof)."""
    expected = fp8_reference(case)
    pool = case.pool
    k_before = [b.view(torch.uint8).clone() for b in pool.k_buffers]
    v_before = [b.view(torch.uint8).clone() for b in pool.v_buffers]
    out = run(case)
    assert out.shape == expected.shape and out.dtype == case.qkv.dtype
    assert torch.isfinite(out).all(), "unwritten output rows or a read of a poisoned slot"
    tol = TOLERANCE[case.qkv.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    _, k_new, v_new = split_qkv(case)
    shape = (-1, case.layer.num_kv_heads, case.layer.head_dim)
    scale = pool.scales[LAYER_ID]
    k_before[LAYER_ID][case.out_cache_loc] = quantize_kv(k_new.reshape(shape), scale.k, pool.dtype).view(
        torch.uint8
    )
    v_before[LAYER_ID][case.out_cache_loc] = quantize_kv(v_new.reshape(shape), scale.v, pool.dtype).view(
        torch.uint8
    )
    for got, want in zip(pool.k_buffers + pool.v_buffers, k_before + v_before, strict=True):
        assert torch.equal(got.view(torch.uint8), want)


def make_fp8_case(prefix, ext, heads, kv_heads, head_dim, dtype, kv_dtype, device="cuda", seed=0, **layer):
    case = make_case(
        np.array(prefix), np.array(ext), heads, kv_heads, head_dim, dtype, device=device, seed=seed, **layer
    )
    return fp8_case(case, kv_dtype)


FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
DECODE_SEQ = np.array([1, 2, 63, 64, 65, 300, 1000, 4096, 129])


@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("num_kv_splits", [None, 1, 8])
def test_triton_decode(kv_dtype, num_kv_splits):
    case = make_fp8_case(
        DECODE_SEQ - 1, np.ones_like(DECODE_SEQ), 32, 8, 128, torch.bfloat16, kv_dtype, seed=1
    )
    check_fp8(case, lambda c: run_triton(c, num_kv_splits))


@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("lens", [[300], [31, 512]], ids=str)
def test_triton_short_decode_prefetch(kv_dtype, lens):
    """One or two short requests: the splits that load their first FP8 block before the wait (SHORT_DECODE)."""
    seq = np.array(lens)
    check_fp8(make_fp8_case(seq - 1, np.ones_like(seq), 16, 4, 128, torch.bfloat16, kv_dtype, seed=2))


@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_triton_extend_mixed(kv_dtype, dtype):
    ext = np.array([1000, 2, 65, 64, 377, 1, 129, 1])
    prefix = np.array([1500, 0, 7, 64, 640, 33, 1, 0])
    check_fp8(make_fp8_case(prefix, ext, 16, 4, 128, dtype, kv_dtype, seed=3))


@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
def test_triton_window_sinks_cap(kv_dtype):
    ext, prefix = np.array([1, 5, 9, 70, 1]), np.array([300, 0, 100, 10, 3])
    case = make_fp8_case(
        prefix, ext, 16, 4, 64, torch.bfloat16, kv_dtype, seed=4, sliding_window=64, sinks=True
    )
    check_fp8(case)
    check_fp8(make_fp8_case(prefix, ext, 16, 4, 64, torch.bfloat16, kv_dtype, seed=5, logit_cap=5.0))


@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
def test_torch_backend_on_cuda(kv_dtype):
    ext, prefix = np.array([1, 70, 1, 9]), np.array([500, 10, 3, 0])
    check_fp8(make_fp8_case(prefix, ext, 16, 4, 128, torch.bfloat16, kv_dtype, seed=6), run_torch)


@pytest.mark.skipif(not HAVE_FLASHINFER, reason="flashinfer-python is not installed")
@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_flashinfer(kv_dtype, decode):
    from sgl_ray.attention.flashinfer_backend import FlashInferAttentionBackend

    def run(case):
        backend = FlashInferAttentionBackend(case.qkv.device)
        return backend.forward(*split_qkv(case), case.layer, make_batch(case, case.pool, backend))

    if decode:
        ext, prefix = np.ones_like(DECODE_SEQ), DECODE_SEQ - 1
    else:
        ext, prefix = np.array([1000, 2, 65, 1, 377]), np.array([1500, 0, 7, 33, 640])
    check_fp8(make_fp8_case(prefix, ext, 32, 8, 128, torch.bfloat16, kv_dtype, seed=7), run)
