"""Triton kernels for ``x @ W.T`` with ``W`` an INT4 matrix in the kept layout of :mod:`.int4` (CUDA; also run by
the tests under Triton's CPU interpreter). The weights are decoded in registers, never written out.

- From ``DEQUANT_MIN_ROWS`` rows of ``x`` (long prefills): :func:`int4_dequantize` into a scratch, then cuBLAS.
- :func:`_int4_gemm`: tiles of ``[BLOCK_M, BLOCK_N]`` outputs. Without act order a K tile lies in one group
  (``BLOCK_K`` divides the group size), so it multiplies the raw ``q - z`` (small integers, exact in 16 bits) and
  scales the tile's partial product once: ``acc += (x @ (q - z)) * s``. With ``g_idx`` each weight is decoded
  with its own group's scale before the dot.
- :func:`_int4_gemv`: one row of ``x`` per program column (decode, ``M <= GEMV_MAX_ROWS``): a ``BLOCK_N`` slab of
  rows streams ``BLOCK_W`` packed words of each row per step. A word's eight values lie in one group, so each lane
  sums ``(q - z) x`` over its word's values and scales that once; lanes add up across the row only at the end
  (the bf16 GEMV's shape: many small programs, loads and multiply-adds in the loop). Values are decoded without
  integer-to-float conversions (see the kernel). With act order (``g_idx``) :func:`_int4_gemv_gidx` decodes each
  value with its own group's scale.

Accumulation is float32; the output has ``x``'s dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sgl_ray.layers import gemv_overrides
from sgl_ray.layers.triton_pdl import launch_args, pdl_enter, use_pdl

GEMV_MAX_ROWS = 4


@triton.jit
def _int4_gemm(
    x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, o_ptr, M, N, K, G, stride_xm, stride_om, group_size,
    HAS_GIDX: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    words = K // 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        wk_mask = k_ok[:, None] & n_ok[None, :]
        packed = tl.load(q_ptr + rn[None, :] * words + (kk // 8)[:, None], mask=wk_mask, other=0)  # [BK, BN]
        q = (packed >> ((kk % 8) * 4)[:, None]) & 0xF
        if HAS_GIDX:
            g = tl.load(g_ptr + kk, mask=k_ok, other=0)
            at = rn[None, :] * G + g[:, None]  # [BK, BN]
            s = tl.load(s_ptr + at, mask=wk_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + at, mask=wk_mask, other=0).to(tl.int32)
            w = ((q - z).to(tl.float32) * s).to(a.dtype)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        else:
            at = rn * G + k0 // group_size  # [BN]: the tile's group
            s = tl.load(s_ptr + at, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + at, mask=n_ok, other=0).to(tl.int32)
            w = (q - z[None, :]).to(a.dtype)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee") * s[None, :]
            else:
                acc += tl.dot(a, w) * s[None, :]
    out = o_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_gemv(
    x_ptr, q_ptr, s_ptr, z_ptr, o_ptr, N, K, G, stride_xm, stride_om, group_size,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rw = tl.arange(0, BLOCK_W)
    words = K // 8
    rows = rn.to(tl.int64)[:, None] * words  # [BN, 1]
    groups = rn[:, None] * G  # [BN, 1]
    pdl_enter(USE_PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w0 in range(0, words, BLOCK_W):
        w_at = w0 + rw  # [BW]
        w_ok = w_at < words
        mask = n_ok[:, None] & w_ok[None, :]
        packed = tl.load(q_ptr + rows + w_at[None, :], mask=mask, other=0)  # [BN, BW]
        at = groups + ((w_at * 8) // group_size)[None, :]  # a word lies in one group
        s = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
        # 2^23 + z: a nibble q OR-ed into the mantissa of 2^23 reads as the float 2^23 + q, so that
        # (2^23 + q) - (2^23 + z) = q - z exactly, without an integer-to-float conversion per value
        zf = tl.load(z_ptr + at, mask=mask, other=0).to(tl.float32) + 8388608.0
        xw = x_ptr + m * stride_xm + w_at * 8
        part = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(xw + i, mask=w_ok, other=0.0).to(tl.float32)  # [BW]: value i of each word
            qi = (((packed >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zf
            part += qi * xi[None, :]
        acc += part * s
    y = tl.sum(acc, axis=1)
    tl.store(o_ptr + m * stride_om + rn, y.to(o_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _int4_gemv_gidx(
    x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, o_ptr, N, K, G, stride_xm, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Act order: each value decoded with its own column's group before the product."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rw = tl.arange(0, BLOCK_K // 8)  # words of a K tile
    ri = tl.arange(0, 8)  # values of a word
    words = K // 8
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_at = k0 // 8 + rw  # [BW]
        w_ok = w_at < words
        packed = tl.load(
            q_ptr + rn[:, None] * words + w_at[None, :], mask=n_ok[:, None] & w_ok[None, :], other=0
        )
        q = (packed[:, :, None] >> (ri * 4)[None, None, :]) & 0xF  # [BN, BW, 8]
        kk = w_at[:, None] * 8 + ri[None, :]  # [BW, 8]
        x = tl.load(x_ptr + m * stride_xm + kk, mask=w_ok[:, None], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + kk, mask=w_ok[:, None], other=0)
        at = rn[:, None, None] * G + g[None, :, :]  # [BN, BW, 8]
        s = tl.load(s_ptr + at, mask=n_ok[:, None, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + at, mask=n_ok[:, None, None], other=0).to(tl.int32)
        acc += tl.sum(tl.sum((q - z).to(tl.float32) * s * x[None, :, :], axis=2), axis=1)
    tl.store(o_ptr + m * stride_om + rn, acc.to(o_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _int4_dequantize(
    q_ptr, s_ptr, z_ptr, g_ptr, o_ptr, N, K, G, group_size,
    HAS_GIDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """``W`` [N, K] in ``o_ptr``'s dtype from the packed words, one ``[BLOCK_N, BLOCK_W]`` tile of words per
    program."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_at = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    words = K // 8
    mask = (rn < N)[:, None] & (w_at < words)[None, :]
    packed = tl.load(q_ptr + rn.to(tl.int64)[:, None] * words + w_at[None, :], mask=mask, other=0)
    out = o_ptr + rn.to(tl.int64)[:, None] * K + (w_at * 8)[None, :]
    if not HAS_GIDX:
        at = rn[:, None] * G + ((w_at * 8) // group_size)[None, :]
        s = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + at, mask=mask, other=0).to(tl.int32)
    for i in tl.static_range(8):
        if HAS_GIDX:
            at = rn[:, None] * G + tl.load(g_ptr + w_at * 8 + i, mask=w_at < words, other=0)[None, :]
            s = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + at, mask=mask, other=0).to(tl.int32)
        value = (((packed >> (4 * i)) & 0xF) - z).to(tl.float32) * s
        tl.store(out + i, value.to(o_ptr.dtype.element_ty), mask=mask)


def int4_dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The INT4 matrix as a dense ``[N, K]`` tensor of ``dtype`` (one kernel; the many-row products multiply by
    it with cuBLAS)."""
    n, words = qweight.shape
    out = torch.empty(n, words * 8, dtype=dtype, device=qweight.device)
    block_n, block_w = 16, 32
    grid = (triton.cdiv(n, block_n), triton.cdiv(words, block_w))
    _int4_dequantize[grid](
        qweight, scales, zeros, g_idx if g_idx is not None else qweight, out, n, words * 8, scales.shape[1],
        group_size, HAS_GIDX=g_idx is not None, BLOCK_N=block_n, BLOCK_W=block_w, num_warps=4,
    )  # fmt: skip
    return out


# From this many rows of x the product dequantizes the weight into a scratch and runs cuBLAS: the GEMM's time
# then dwarfs the extra pass over the weights (twice their bf16 bytes), and cuBLAS's tiles beat this module's
# Triton GEMM on long prefills.
DEQUANT_MIN_ROWS = 256


class Int4GemvConfig(NamedTuple):
    block_n: int  # rows of W per program
    block_w: int  # packed words (8 values each) of a row per loop step
    num_warps: int
    num_stages: int


# Launch shapes of the one-row GEMV by weight shape (N, K), from `python -m sgl_ray.bench.quant_kernels --tune`;
# other shapes take the default (see gemv_config).
GEMV_TABLE: dict[tuple[int, int], Int4GemvConfig] = {}
DEFAULT_GEMV = Int4GemvConfig(block_n=4, block_w=64, num_warps=1, num_stages=4)


def gemv_config(n: int, k: int) -> Int4GemvConfig:
    """The one-row GEMV's launch shape for an ``[N, K]`` weight: a saved measurement
    (:mod:`sgl_ray.layers.gemv_overrides`), else the table's entry, else the default."""
    saved = gemv_overrides.tuned("int4", n, k)
    return Int4GemvConfig(*saved) if saved else GEMV_TABLE.get((n, k), DEFAULT_GEMV)


def _tile_k(group_size: int, cap: int) -> int:
    """The largest power of two up to ``cap`` that divides ``group_size`` (a K tile inside one group)."""
    k = cap
    while k > 16 and group_size % k:
        k //= 2
    return k


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    config: Int4GemvConfig | None = None,
) -> torch.Tensor:
    """``x @ W.T``: ``x`` [M, K] (fp16, bf16 or fp32), ``W`` the INT4 matrix ``qweight`` [N, K/8] (int32),
    ``scales`` [N, G], ``zeros`` [N, G] (uint8), ``g_idx`` [K] (int32) or None; ``config`` the one-row GEMV's
    launch shape (default :func:`gemv_config`). Returns [M, N] in ``x``'s dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n, groups = qweight.shape[0], scales.shape[1]
    if (
        g_idx is None and group_size % 16
    ):  # a K tile (or a word) cannot lie in one group: name each column's group
        g_idx = (torch.arange(k, device=x.device, dtype=torch.int32) // group_size).contiguous()
    has_gidx = g_idx is not None
    g = g_idx if has_gidx else qweight  # an unused pointer without act order
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if m <= GEMV_MAX_ROWS:
        if has_gidx:
            grid = (triton.cdiv(n, 32), m)
            _int4_gemv_gidx[grid](
                x, qweight, scales, zeros, g, out, n, k, groups, x.stride(0), out.stride(0),
                BLOCK_N=32, BLOCK_K=64, num_warps=4,
            )  # fmt: skip
            return out
        cfg = config or gemv_config(n, k)
        pdl = use_pdl(x)
        grid = (triton.cdiv(n, cfg.block_n), m)
        _int4_gemv[grid](
            x, qweight, scales, zeros, out, n, k, groups, x.stride(0), out.stride(0), group_size,
            BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w, USE_PDL=pdl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_args(pdl),
        )  # fmt: skip
        return out
    if m >= DEQUANT_MIN_ROWS and x.dtype != torch.float32:
        w = int4_dequantize(qweight, scales, zeros, group_size, g_idx, x.dtype)
        return torch.mm(x, w.t(), out=out)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 64, (32 if has_gidx else _tile_k(group_size, 64))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm[grid](
        x, qweight, scales, zeros, g, out, m, n, k, groups, x.stride(0), out.stride(0), group_size,
        HAS_GIDX=has_gidx, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out
