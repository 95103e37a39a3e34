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


def check_rotary_store(
    device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, norms: bool = False
) -> None:
    """The fused rotary + KV store against the torch path: (with ``norms``, Qwen3's per-head q/k RMSNorm first,)
    rotate q and k, ``index_copy_`` k and v into the pool (also run on the CPU by Triton's interpreter:
    tests/unit/test_triton_interpreter.py)."""
    from sgl_ray.layers import triton_ops
    from sgl_ray.layers.norm import RMSNorm

    tokens, slots = 11, 64
    g = torch.Generator().manual_seed(heads)
    rope = RotaryEmbedding(head_dim, {"rope_theta": 10000.0}, 4096).to(device)
    cos, sin = rope.cos_sin(torch.randint(0, 4096, (tokens,), generator=g).to(device), dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype)
    loc = torch.randperm(slots - 1, generator=g)[:tokens].add(1).to(device)
    k_cache = torch.full((slots, kv_heads, head_dim), 7.0, dtype=dtype, device=device)  # poison
    v_cache = k_cache.clone()
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, -1, head_dim)
    kwargs = {}
    if norms:
        q_norm, k_norm = (RMSNorm(head_dim, 1e-6).to(device, dtype) for _ in range(2))
        for n in (q_norm, k_norm):
            n.weight.copy_(1 + 0.3 * torch.randn(head_dim, generator=g).to(device, dtype))
        kwargs = dict(q_norm=q_norm.weight, k_norm=k_norm.weight, eps=1e-6)
        # the torch path, one head at a time (RMSNorm's CUDA kernel takes 2-D rows)
        qk = torch.cat([q_norm._norm(qk[:, :heads]), k_norm._norm(qk[:, heads:])], dim=1)
    q, k = triton_ops.rotary_store(qkv, cos, sin, loc, k_cache, v_cache, heads, kv_heads, **kwargs)
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
@pytest.mark.parametrize("norms", [False, True])
def test_rotary_store_matches_rotary_and_index_copy(dtype, heads, kv_heads, head_dim, norms):
    check_rotary_store("cuda", dtype, heads, kv_heads, head_dim, norms)


def check_qkv_rotary_store_gemv(
    device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, pdl: bool | None = None,
    norms: bool = False,
) -> None:  # fmt: skip
    """The QKV GEMV with rotary and the KV store as its epilogue against the GEMV then ``rotary_store``, in the
    same launch shape: the same bits, and k and v in the pool only at the step's rows (also run on the CPU by
    Triton's interpreter: tests/unit/test_triton_interpreter.py). ``norms``: with per-head q/k RMSNorms first
    (Qwen3), whose counters are zero again after every launch."""
    from sgl_ray.layers import triton_ops
    from sgl_ray.layers.triton_gemv import GemvConfig

    slots, hidden = 32, 96
    g = torch.Generator().manual_seed(heads * head_dim)
    rope = RotaryEmbedding(head_dim, {"rope_theta": 10000.0}, 4096).to(device)
    n = (heads + 2 * kv_heads) * head_dim
    w = (torch.randn(n, hidden, generator=g) / hidden**0.5).to(device, dtype)
    configs = [None, GemvConfig(4, 64, 2, 2), GemvConfig(8, 32, 4, 3, lane_acc=False, prefetch=2)]
    extra = {}
    if norms:
        weights = [(1 + 0.3 * torch.randn(head_dim, generator=g)).to(device, dtype) for _ in range(2)]
        extra = dict(q_norm=weights[0], k_norm=weights[1], eps=1e-6)
        counters = torch.zeros(heads + kv_heads, dtype=torch.int32, device=device)
    for bias, cfg in zip([None, torch.randn(n, generator=g).to(device, dtype), None], configs, strict=True):
        x = torch.randn(1, hidden + 8, generator=g).to(device, dtype)[:, 4 : 4 + hidden]  # a strided row
        cos, sin = rope.cos_sin(torch.randint(0, 4096, (1,), generator=g).to(device), dtype)
        loc = torch.randint(1, slots, (1,), generator=g).to(device)
        caches = [torch.full((slots, kv_heads, head_dim), 7.0, dtype=dtype, device=device) for _ in range(4)]
        qkv = triton_ops.gemv(x, w, bias, config=cfg, pdl=pdl)
        q, k = triton_ops.rotary_store(qkv, cos, sin, loc, caches[0], caches[1], heads, kv_heads, **extra)
        store = triton_ops.RotaryStore(cos, sin, loc, caches[2], caches[3], heads, kv_heads)
        if norms:
            store = store._replace(
                q_norm=extra["q_norm"], k_norm=extra["k_norm"], norm_eps=extra["eps"], counters=counters
            )
        out = triton_ops.qkv_rotary_store_gemv(x, w, bias, store, config=cfg, pdl=pdl)
        if norms:
            assert not counters.any(), "the head counters are left zero for the next launch"
        assert out.shape == (1, n) and out.dtype == dtype
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        # the same bits; with norms, the head's sum of squares is reduced in another order than the separate
        # kernel's (one head per program instead of 16), so its rounding may move by a unit in the last place
        same = ULP2[dtype] if norms else dict(atol=0, rtol=0)
        torch.testing.assert_close(out[:, :q_size], q.view(1, -1), **same)
        torch.testing.assert_close(out[:, q_size : q_size + kv_size], k.view(1, -1), **same)
        assert torch.equal(out[:, q_size + kv_size :], qkv[:, q_size + kv_size :])
        torch.testing.assert_close(caches[2], caches[0], **same)
        assert torch.equal(caches[3], caches[1])
        assert (caches[3][loc] != 7).any() and (caches[3][:1] == 7).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pdl", [False, None], ids=["plain", "pdl-if-supported"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (6, 2, 64), (4, 1, 16)])
@pytest.mark.parametrize("norms", [False, True], ids=["", "qk-norms"])
def test_qkv_gemv_with_rotary_store_matches_the_separate_kernels(
    dtype, pdl, heads, kv_heads, head_dim, norms
):
    check_qkv_rotary_store_gemv("cuda", dtype, heads, kv_heads, head_dim, pdl, norms)


def check_norm_in_gemvs(
    device: str, dtype: torch.dtype, pdl: bool | None = None, inner: int = 160, out_rows: int = 2 * 192 + 16
) -> None:
    """RMSNorm split over two GEMVs, with its scale folded into the second's weights: the producer adds the
    residual (the same bits as the GEMV then the RMSNorm kernel's add) and writes its parts' sums of squares, the
    consumer scales its product by them; against RMSNorm then ``F.linear`` in fp32 (also run on the CPU by
    Triton's interpreter: tests/unit/test_triton_interpreter.py, with a smaller ``inner`` (the producer's K) and
    ``out_rows`` (the consumer's N))."""
    from sgl_ray.layers import triton_ops
    from sgl_ray.layers.triton_gemv import GemvConfig

    g = torch.Generator().manual_seed(3)
    hidden, heads, kv_heads, head_dim = 192, 4, 2, 16
    norm = RMSNorm(hidden, eps=1e-5).to(device)
    norm.weight.data = (1 + 0.2 * torch.randn(hidden, generator=g)).to(device, dtype)
    w_in = (torch.randn(hidden, inner, generator=g) / inner**0.5).to(device, dtype)
    w_out = (torch.randn(out_rows, hidden, generator=g) / hidden**0.5).to(device, dtype)
    folded = (w_out.float() * norm.weight.float()).to(dtype)
    bias = torch.randn(hidden, generator=g).to(device, dtype)
    tol = {torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}[dtype]
    for cfg in [None, GemvConfig(4, 64, 2, 2), GemvConfig(16, 32, 4, 3, lane_acc=False, prefetch=2)]:
        for silu in (False, True):
            x = torch.randn(1, 2 * inner if silu else inner, generator=g).to(device, dtype)
            r = (torch.randn(1, hidden, generator=g) * 4).to(device, dtype)
            b = None if silu else bias
            h, sumsq = triton_ops.residual_gemv(x, w_in, r, b, silu_mul=silu, config=cfg, pdl=pdl)
            y = (triton_ops.silu_mul_gemv if silu else triton_ops.gemv)(x, w_in, b, config=cfg, pdl=pdl)
            assert torch.equal(h, (y.float() + r.float()).to(dtype))
            assert sumsq.dtype == torch.float32 and sumsq.shape[0] == 1 and sumsq.shape[1] > 1
            torch.testing.assert_close(sumsq.sum(), h.float().pow(2).sum(), atol=0, rtol=1e-5)
            want = F.linear(norm._norm(h).float(), w_out.float())
            got = triton_ops.normed_gemv(
                h, triton_ops.NormOfInput(sumsq, norm.eps), folded, config=cfg, pdl=pdl
            )
            torch.testing.assert_close(got.float(), want, **tol)
            exact = F.linear(h.float() * torch.rsqrt(h.float().pow(2).mean() + norm.eps), folded.float())
            torch.testing.assert_close(got.float(), exact, **ULP2[dtype])
    # and with rotary + the KV store after it (the QKV projection of a folded layer)
    rope = RotaryEmbedding(head_dim, {"rope_theta": 10000.0}, 64).to(device)
    cos, sin = rope.cos_sin(torch.tensor([37], device=device), dtype)
    n = (heads + 2 * kv_heads) * head_dim
    caches = [torch.zeros((8, kv_heads, head_dim), dtype=dtype, device=device) for _ in range(4)]
    loc = torch.tensor([5], device=device)
    q, k = triton_ops.rotary_store(
        triton_ops.gemv(norm(h), w_out[:n]), cos, sin, loc, caches[0], caches[1], heads, kv_heads
    )
    store = triton_ops.RotaryStore(cos, sin, loc, caches[2], caches[3], heads, kv_heads)
    norm_in = triton_ops.NormOfInput(sumsq, norm.eps)
    qkv = triton_ops.qkv_rotary_store_gemv(h, folded[:n], None, store, norm=norm_in, pdl=pdl)
    torch.testing.assert_close(qkv[:, : heads * head_dim], q.view(1, -1), **tol)
    torch.testing.assert_close(qkv[:, heads * head_dim : (heads + kv_heads) * head_dim], k.view(1, -1), **tol)
    torch.testing.assert_close(caches[2], caches[0], **tol)
    torch.testing.assert_close(caches[3], caches[1], **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pdl", [False, None], ids=["plain", "pdl-if-supported"])
def test_rmsnorm_split_over_two_gemvs_matches_the_norm_kernel(dtype, pdl):
    check_norm_in_gemvs("cuda", dtype, pdl)


GEMV_SHAPES = [(37, 100, False), (64, 1024, True), (4096, 576, False), (5, 3000, True)]  # (N, K, bias)


def check_gemv(
    device: str,
    dtype: torch.dtype,
    pdl: bool | None = None,
    shapes: list[tuple[int, int, bool]] = GEMV_SHAPES,
) -> None:
    """The batch-1 GEMV against ``F.linear`` in fp32 on the same inputs: ragged and even K, with and without
    a bias, a strided row (also run on the CPU by Triton's interpreter: tests/unit/test_triton_interpreter.py,
    with a narrower N in place of 4096)."""
    from sgl_ray.layers.triton_gemv import GemvConfig, gemv

    g = torch.Generator().manual_seed(0)
    for n, k, bias in shapes:
        wide = torch.randn(1, k + 16, generator=g).to(device, dtype)
        x = wide[:, 8 : 8 + k]  # a row of a wider tensor, as q of the fused qkv
        w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
        b = torch.randn(n, generator=g).to(device, dtype) if bias else None
        expected = F.linear(x.float(), w.float(), None if b is None else b.float())
        configs = [None, GemvConfig(16, 64, 4, 2, lane_acc=False), GemvConfig(4, 128, 2, 3, prefetch=4)]
        for cfg in configs:
            kwargs = {} if cfg is None else {"config": cfg}
            out = gemv(x, w, b, pdl=pdl, **kwargs)
            assert out.shape == (1, n) and out.dtype == dtype
            # fp32 accumulation, one rounding at the end
            torch.testing.assert_close(out.float(), expected, **ULP2[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pdl", [False, None], ids=["plain", "pdl-if-supported"])
def test_gemv_matches_linear(dtype, pdl):
    check_gemv("cuda", dtype, pdl)


def check_fused_gemvs(
    device: str, dtype: torch.dtype, pdl: bool | None = None, shapes: list[tuple[int, int]] | None = None
) -> None:
    """RMSNorm (with and without the residual add) and SiLU-and-mul fused into the GEMV, against the separate
    torch ops (same rounding steps) followed by ``F.linear`` in fp32 (``shapes``: the (N, K) of the weights)."""
    from sgl_ray.layers.norm import RMSNorm
    from sgl_ray.layers.triton_gemv import GemvConfig, rmsnorm_gemv, silu_mul_gemv

    g = torch.Generator().manual_seed(0)
    configs = [None, GemvConfig(4, 128, 2, 3, prefetch=2), GemvConfig(8, 64, 4, 2, lane_acc=False)]
    if shapes is None:  # the interpreter is slow
        shapes = [(48, 256), (100, 1000)] + ([(4096, 576)] if device != "cpu" else [])
    for n, k in shapes:
        w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
        x = (torch.randn(1, k, generator=g) * 3).to(device, dtype)
        r = torch.randn(1, k, generator=g).to(device, dtype)
        norm = RMSNorm(k, eps=1e-5).to(device)
        norm.weight.data = (1 + 0.1 * torch.randn(k, generator=g)).to(device, dtype)
        h = (x.float() + r.float()).to(dtype)
        for residual, h_want in [(r, h), (None, x)]:
            xn = norm._norm(h_want)  # the torch path's rounding, step by step
            expected = F.linear(xn.float(), w.float())
            for cfg in configs:
                out, r_out = rmsnorm_gemv(x, residual, norm.weight, norm.eps, w, config=cfg, pdl=pdl)
                assert out.shape == (1, n) and out.dtype == dtype
                torch.testing.assert_close(out.float(), expected, **ULP2[dtype])
                assert torch.equal(r_out, h_want)
        gate_up = torch.randn(1, 2 * k, generator=g).to(device, dtype) * 2
        gate, up = gate_up.chunk(2, dim=-1)
        act = (F.silu(gate.float()).to(dtype).float() * up.float()).to(dtype)
        b = torch.randn(n, generator=g).to(device, dtype)
        expected = F.linear(act.float(), w.float(), b.float())
        for cfg in configs:
            out = silu_mul_gemv(gate_up, w, b, config=cfg, pdl=pdl)
            torch.testing.assert_close(out.float(), expected, **ULP2[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pdl", [False, None], ids=["plain", "pdl-if-supported"])
def test_fused_gemvs_match_the_separate_ops(dtype, pdl):
    check_fused_gemvs("cuda", dtype, pdl)


def check_quantized_gemvs(
    device: str, dtype: torch.dtype, shapes: list[tuple[int, int]], pdl: bool | None = None
) -> None:
    """The bf16 GEMV's kernel on quantized weights as they are held (what the one-row decode paths of FP8 and
    INT4 models run): FP8 e4m3 with per-row scales and INT4 words with group scales and zero points (groups of 32;
    ``shapes``' K a multiple of 32), plain, with SiLU-and-mul, and the QKV GEMV with rotary and the KV store,
    against the dequantized weight in fp32 (plain, SiLU-and-mul) and against the same GEMV then
    ``rotary_store`` (the same bits)."""
    from sgl_ray.layers.quantization.fp8 import quantize_fp8_rows
    from sgl_ray.layers.quantization.int4 import Int4Matrix, pack_int4
    from sgl_ray.layers.triton_gemv import GemvConfig, gemv, silu_mul_gemv

    g = torch.Generator().manual_seed(1)

    def quantized(n: int, k: int, fmt: str) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(held weight, the GEMV's keywords, the float weight it means)."""
        if fmt == "fp8":
            q, s = quantize_fp8_rows(torch.randn(n, k, generator=g) / k**0.5)
            return q.to(device), {"weight_scale": s.view(-1).to(device)}, (q.float() * s).to(device)
        group = 32
        m = Int4Matrix(
            pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)),
            (torch.rand(n, k // group, generator=g) * 0.02 / k**0.5 + 1e-3).to(dtype),
            torch.randint(0, 17, (n, k // group), generator=g, dtype=torch.uint8),
            group,
        ).to(torch.device(device))
        quant = {"weight_scale": m.scales, "weight_zeros": m.zeros, "group_size": group}
        return m.qweight, quant, m.dequantize().to(device)

    configs = [None, GemvConfig(4, 64, 2, 2), GemvConfig(8, 128, 4, 3, lane_acc=False, prefetch=2)]
    for fmt in ("fp8", "int4"):
        for n, k in shapes:
            q, quant, w = quantized(n, k, fmt)
            x = torch.randn(1, k, generator=g).to(device, dtype)
            gate_up = torch.randn(1, 2 * k, generator=g).to(device, dtype)
            gate, up = gate_up.float().chunk(2, dim=-1)
            act = (F.silu(gate).to(dtype).float() * up).to(dtype)
            for cfg in configs:
                out = gemv(x, q, config=cfg, pdl=pdl, **quant)
                assert out.shape == (1, n) and out.dtype == dtype
                torch.testing.assert_close(out.float(), F.linear(x.float(), w), **ULP2[dtype])
                out = silu_mul_gemv(gate_up, q, config=cfg, pdl=pdl, **quant)
                torch.testing.assert_close(out.float(), F.linear(act.float(), w), **ULP2[dtype])
        with pytest.raises(ValueError, match="needs its scales"):
            gemv(x, q, pdl=pdl)
    heads, kv_heads, head_dim, slots = 4, 2, 32, 16
    n, k = (heads + 2 * kv_heads) * head_dim, 96
    for fmt in ("fp8", "int4"):
        q, quant, _ = quantized(n, k, fmt)
        check_rotary_store_epilogue(device, dtype, q, quant, heads, kv_heads, head_dim, slots, pdl)


def check_rotary_store_epilogue(device, dtype, q, quant, heads, kv_heads, head_dim, slots, pdl) -> None:
    """The QKV GEMV of a quantized weight with rotary and the KV store: the bits of the GEMV then
    ``rotary_store``."""
    from sgl_ray.layers import triton_ops
    from sgl_ray.layers.triton_gemv import gemv

    k = q.shape[1] * (8 if q.dtype == torch.int32 else 1)
    g = torch.Generator().manual_seed(2)
    rope = RotaryEmbedding(head_dim, {"rope_theta": 10000.0}, 512).to(device)
    cos, sin = rope.cos_sin(torch.tensor([37], device=device), dtype)
    loc = torch.tensor([5], device=device)
    x = torch.randn(1, k, generator=g).to(device, dtype)
    caches = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(4)]
    qkv = gemv(x, q, pdl=pdl, **quant)
    q_rot, k_rot = triton_ops.rotary_store(qkv, cos, sin, loc, caches[0], caches[1], heads, kv_heads)
    store = triton_ops.RotaryStore(cos, sin, loc, caches[2], caches[3], heads, kv_heads)
    out = triton_ops.qkv_rotary_store_gemv(x, q, None, store, pdl=pdl, **quant)
    q_size = heads * head_dim
    assert torch.equal(out[:, :q_size], q_rot.reshape(1, -1))
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    assert caches[3][5].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_weights_in_the_gemv_kernels(dtype):
    check_quantized_gemvs("cuda", dtype, [(48, 256), (100, 992), (4096, 576)])


def test_linear_layers_dispatch_one_row_to_the_gemv():
    from sgl_ray.layers.linear import ColumnParallelLinear, linear

    layer = ColumnParallelLinear(256, 384, bias=True).cuda().to(torch.bfloat16)
    layer.weight.data.normal_(std=0.05)
    layer.bias.data.normal_()
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    one = layer(x[:1])
    torch.testing.assert_close(one, linear(x[:1], layer.weight, layer.bias), atol=0, rtol=0)
    torch.testing.assert_close(one.float(), F.linear(x[:1].float(), layer.weight.float(), layer.bias.float()),
                               **ULP2[torch.bfloat16])  # fmt: skip
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)  # cuBLAS


def test_fused_projections_match_the_separate_modules(monkeypatch):
    """``norm_linear`` / ``silu_mul_linear`` as the decoder layer calls them: on one row they take the fused GEMV,
    on several rows the separate modules; both agree with the modules within bf16 rounding."""
    from sgl_ray.layers import fused_linear
    from sgl_ray.layers.activation import SiluAndMul
    from sgl_ray.layers.fused_linear import norm_linear, silu_mul_linear

    monkeypatch.setattr(fused_linear, "FUSE_NORM", True)  # off in the model (slower, see there)
    from sgl_ray.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    from sgl_ray.layers.norm import RMSNorm

    torch.manual_seed(0)
    with torch.device("cuda"):
        norm = RMSNorm(512, eps=1e-5).to(torch.bfloat16)
        up = MergedColumnParallelLinear(512, [768, 768]).to(torch.bfloat16)
        down = RowParallelLinear(768, 512, bias=True).to(torch.bfloat16)
        for p in (norm.weight, up.weight, down.weight, down.bias):
            p.data.normal_(1.0 if p is norm.weight else 0.0, 0.05)
        x = torch.randn(3, 512, dtype=torch.bfloat16)
        r = torch.randn(3, 512, dtype=torch.bfloat16)
    act = SiluAndMul()
    for rows in (1, 3):
        for res in (r[:rows], None):
            got, got_res = norm_linear(norm, up, x[:rows], res)
            h, want_res = norm(x[:rows], res) if res is not None else (norm(x[:rows]), x[:rows])
            want = up(h)
            assert torch.equal(got_res, want_res)
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(silu_mul_linear(act, down, got), down(act(got)), atol=2e-2, rtol=2e-2)
        if rows == 3:  # several rows: exactly the modules
            assert torch.equal(norm_linear(norm, up, x, r)[0], up(norm(x, r)[0]))


def test_pdl_chain_in_a_cuda_graph_matches_eager():
    """RMSNorm -> GEMV -> SiLU-and-mul -> GEMV, each launched with PDL where supported, captured in a graph and
    replayed on new inputs: the same results as the same kernels run eagerly, and as torch in fp32."""
    from sgl_ray.layers.linear import linear

    ops = _ops()
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden, inter = 1024, 2816
    w_up = torch.randn(2 * inter, hidden, device="cuda", generator=g).div(hidden**0.5).to(torch.bfloat16)
    w_down = torch.randn(hidden, inter, device="cuda", generator=g).div(inter**0.5).to(torch.bfloat16)
    norm_w = torch.rand(hidden, device="cuda", generator=g).add(0.5).to(torch.bfloat16)
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)

    def step():
        h, r = ops.rmsnorm(x, norm_w, 1e-5, res)
        return linear(ops.silu_and_mul(linear(h, w_up)), w_down) + r

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        x.copy_(torch.randn(1, hidden, device="cuda", generator=g))
        res.copy_(torch.randn(1, hidden, device="cuda", generator=g))
        graph.replay()
        torch.testing.assert_close(out, step(), atol=0, rtol=0)
    h = RMSNorm(hidden, 1e-5).cuda()
    h.weight.data = norm_w.float()
    ref_h = h._norm((x + res).float())
    gate, up = F.linear(ref_h, w_up.float()).chunk(2, dim=-1)
    ref = F.linear(F.silu(gate) * up, w_down.float()) + (x + res).float()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
