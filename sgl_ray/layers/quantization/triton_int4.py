"""Triton kernels for ``x @ W.T`` with ``W`` an INT4 matrix in the kept layout of :mod:`.int4` (CUDA; also run by
the tests under Triton's CPU interpreter). The weights are decoded in registers, never written out.

- :func:`_int4_gemm`: tiles of ``[BLOCK_M, BLOCK_N]`` outputs. Without act order a K tile lies in one group
  (``BLOCK_K`` divides the group size), so it multiplies the raw ``q - z`` (small integers, exact in 16 bits) and
  scales the tile's partial product once: ``acc += (x @ (q - z)) * s``. With ``g_idx`` each weight is decoded
  with its own group's scale before the dot.
- :func:`_int4_gemv`: one row of ``x`` per program column (decode, ``M <= GEMV_MAX_ROWS``): a ``BLOCK_N`` slab of
  rows reads its packed words once, ``sum((q - z) x) * s = (sum(q x) - z sum(x)) * s`` per group.

Accumulation is float32; the output has ``x``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, o_ptr, N, K, G, stride_xm, stride_om, group_size,
    HAS_GIDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
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
        if HAS_GIDX:
            g = tl.load(g_ptr + kk, mask=w_ok[:, None], other=0)
            at = rn[:, None, None] * G + g[None, :, :]  # [BN, BW, 8]
            s = tl.load(s_ptr + at, mask=n_ok[:, None, None], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + at, mask=n_ok[:, None, None], other=0).to(tl.int32)
            acc += tl.sum(tl.sum((q - z).to(tl.float32) * s * x[None, :, :], axis=2), axis=1)
        else:
            at = rn * G + k0 // group_size
            s = tl.load(s_ptr + at, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + at, mask=n_ok, other=0).to(tl.float32)
            qx = tl.sum(tl.sum(q.to(tl.float32) * x[None, :, :], axis=2), axis=1)  # [BN]
            acc += (qx - z * tl.sum(tl.sum(x, axis=1), axis=0)) * s
    tl.store(o_ptr + m * stride_om + rn, acc.to(o_ptr.dtype.element_ty), mask=n_ok)


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
) -> torch.Tensor:
    """``x @ W.T``: ``x`` [M, K] (fp16, bf16 or fp32), ``W`` the INT4 matrix ``qweight`` [N, K/8] (int32),
    ``scales`` [N, G], ``zeros`` [N, G] (uint8), ``g_idx`` [K] (int32) or None. Returns [M, N] in ``x``'s dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n, groups = qweight.shape[0], scales.shape[1]
    if g_idx is None and group_size % 16:  # a K tile cannot lie in one group: name each column's group
        g_idx = (torch.arange(k, device=x.device, dtype=torch.int32) // group_size).contiguous()
    has_gidx = g_idx is not None
    g = g_idx if has_gidx else qweight  # an unused pointer without act order
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if m <= GEMV_MAX_ROWS:
        block_n, block_k = 32, (64 if has_gidx else _tile_k(group_size, 128))
        grid = (triton.cdiv(n, block_n), m)
        _int4_gemv[grid](
            x, qweight, scales, zeros, g, out, n, k, groups, x.stride(0), out.stride(0), group_size,
            HAS_GIDX=has_gidx, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip
        return out
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 64, (32 if has_gidx else _tile_k(group_size, 64))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm[grid](
        x, qweight, scales, zeros, g, out, m, n, k, groups, x.stride(0), out.stride(0), group_size,
        HAS_GIDX=has_gidx, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out
