"""The fused CUDA kernels against the torch path they replace (run on the device: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgl_ray.layers.norm import RMSNorm
from sgl_ray.layers.rotary import RotaryEmbedding, rotate_half

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Two units in the last place at unit magnitude (inputs are ~N(0, 1); a difference of sums that nearly cancel keeps
# the absolute error of its terms): Triton's exp, conversions and reduction order may differ from torch's in the
# last bit.
ULP2 = {torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}
ULP2[torch.float32] = dict(atol=1e-5, rtol=1e-5)


def _ops():
    from sgl_ray.layers import triton_ops

    return triton_ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (7, 576), (33, 1000)])
def test_rmsnorm_matches_torch(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    res = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    norm = RMSNorm(shape[1], 1e-5).cuda().to(dtype)
    norm.weight.data = torch.rand(shape[1], device="cuda", generator=g).to(dtype) + 0.5
    tol = ULP2[dtype]
    torch.testing.assert_close(_ops().rmsnorm(x, norm.weight, 1e-5), norm._norm(x), **tol)
    out, new_res = _ops().rmsnorm(x, norm.weight, 1e-5, res)
    torch.testing.assert_close(new_res, res + x, atol=0, rtol=0)
    torch.testing.assert_close(out, norm._norm(res + x), **tol)
    # The layer dispatches to the kernel on CUDA.
    torch.testing.assert_close(norm(x, res)[0], out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 14336), (5, 1536), (17, 100)])
def test_silu_and_mul_matches_torch(dtype, tokens, inter):
    x = torch.randn(tokens, 2 * inter, device="cuda", dtype=dtype) * 3
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(_ops().silu_and_mul(x), F.silu(gate) * up, **ULP2[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 2, 16)])
def test_rotary_matches_torch_on_strided_qk(dtype, heads, kv_heads, head_dim):
    tokens = 13
    rope = RotaryEmbedding(head_dim, {"rope_theta": 10000.0}, 4096).cuda()
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    cos_sin = rope.cos_sin(positions, dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, -1, head_dim)  # strided, as in the model
    cos, sin = cos_sin
    expected = qk * cos + rotate_half(qk) * sin
    out = _ops().rotary(qk, cos, sin)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, **ULP2[dtype])


def check_rotary_store(device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    """The fused rotary + KV store against the torch path: rotate q and k, ``index_copy_`` k and v into the pool
    (also run on the CPU by Triton's interpreter: tests/unit/test_triton_interpreter.py)."""
    from sgl_ray.layers import triton_ops

    tokens, slots = 11, 64
    g = torch.Generator().manual_seed(heads)
    rope = RotaryEmbedding(head_dim, {"rope_theta": 10000.0}, 4096).to(device)
    cos, sin = rope.cos_sin(torch.randint(0, 4096, (tokens,), generator=g).to(device), dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype)
    loc = torch.randperm(slots - 1, generator=g)[:tokens].add(1).to(device)
    k_cache = torch.full((slots, kv_heads, head_dim), 7.0, dtype=dtype, device=device)  # poison
    v_cache = k_cache.clone()
    q, k = triton_ops.rotary_store(qkv, cos, sin, loc, k_cache, v_cache, heads, kv_heads)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, -1, head_dim)
    expected = qk * cos + rotate_half(qk) * sin
    tol = ULP2[dtype]
    torch.testing.assert_close(q, expected[:, :heads], **tol)
    torch.testing.assert_close(k, expected[:, heads:], **tol)
    torch.testing.assert_close(k_cache[loc], k, atol=0, rtol=0)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    torch.testing.assert_close(v_cache[loc], v, atol=0, rtol=0)
    untouched = torch.ones(slots, dtype=torch.bool, device=device)
    untouched[loc] = False
    assert (k_cache[untouched] == 7).all() and (v_cache[untouched] == 7).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 2, 16)])
def test_rotary_store_matches_rotary_and_index_copy(dtype, heads, kv_heads, head_dim):
    check_rotary_store("cuda", dtype, heads, kv_heads, head_dim)
