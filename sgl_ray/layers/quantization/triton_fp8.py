"""Triton kernels for ``x @ W.T`` with ``W`` an FP8 e4m3 matrix of :mod:`.fp8` (CUDA with compute capability
8.9 or more; the tests also run them under Triton's CPU interpreter).

- :func:`_fp8_gemm` (W8A8): ``x`` arrives quantized to e4m3 with float32 scales per token, or per token and
  ``block_k`` columns when the weight has block scales. Per-row weight scales: the FP8 dot accumulates all of K in
  float32 and the tile is scaled once by ``sx[m] * sw[n]``; block scales: each K tile (inside one block) is scaled
  by ``sx[m, kb] * sw[n, kb]`` as it is added.
- :func:`_fp8_gemv` (weight-only, ``M <= GEMV_MAX_ROWS``): the e4m3 weights are widened in registers and
  multiplied by the 16-bit activations, no activation quantization (decode steps read each weight byte once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_ray.layers.quantization.fp8 import quantize_fp8_groups, quantize_fp8_rows

GEMV_MAX_ROWS = 4


@triton.jit
def _fp8_gemm(
    a_ptr, as_ptr, b_ptr, bs_ptr, o_ptr, M, N, K, stride_am, stride_asm, stride_ask, stride_bsn, stride_om, block_k,
    BLOCKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(b_ptr + rn[None, :] * K + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if BLOCKED:
            kb = k0 // block_k
            sa = tl.load(as_ptr + rm * stride_asm + kb * stride_ask, mask=m_ok, other=0.0)
            sb = tl.load(bs_ptr + rn * stride_bsn + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        else:
            acc += tl.dot(a, b)
    if not BLOCKED:
        sa = tl.load(as_ptr + rm * stride_asm, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + rn * stride_bsn, mask=n_ok, other=0.0)
        acc = acc * (sa[:, None] * sb[None, :])
    out = o_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp8_gemv(
    x_ptr, w_ptr, ws_ptr, o_ptr, N, K, stride_xm, stride_wsn, stride_om, block_k,
    BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + m * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)
        part = tl.sum(w.to(tl.float32) * x[None, :], axis=1)  # [BN]
        if BLOCKED:
            acc += part * tl.load(ws_ptr + rn * stride_wsn + k0 // block_k, mask=n_ok, other=0.0)
        else:
            acc += part
    if not BLOCKED:
        acc = acc * tl.load(ws_ptr + rn * stride_wsn, mask=n_ok, other=0.0)
    tl.store(o_ptr + m * stride_om + rn, acc.to(o_ptr.dtype.element_ty), mask=n_ok)


def quantize_activations(x: torch.Tensor, block_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] -> ``(fp8 [M, K], float32 scales)``: [M, K / block_k] when the weight has block scales and
    ``block_k`` divides K, else one scale per token [M, 1]."""
    if block_k is not None and x.shape[1] % block_k == 0:
        return quantize_fp8_groups(x, block_k)
    return quantize_fp8_rows(x)


def _tile_k(block_k: int | None, cap: int) -> int:
    """A K tile: ``cap``, or with block scales the largest power of two up to ``cap`` that divides ``block_k``."""
    if block_k is None:
        return cap
    tile = cap
    while tile > 16 and block_k % tile:
        tile //= 2
    if block_k % tile:
        raise ValueError(f"FP8 block scales of {block_k} columns: the kernels need a multiple of 16")
    return tile


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_k: int | None, w8a8: bool | None = None
) -> torch.Tensor:
    """``x @ W.T`` for ``x`` [M, K] and the FP8 matrix ``weight`` [N, K] (e4m3) with float32 ``scale`` [N, 1]
    (per row) or [N, ceil(K / block_k)]. ``w8a8``: the GEMM on quantized activations (default: for more than
    ``GEMV_MAX_ROWS`` rows) or the weight-only GEMV. Returns [M, N] in ``x``'s dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    blocked = block_k is not None
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if not (m > GEMV_MAX_ROWS if w8a8 is None else w8a8):
        grid = (triton.cdiv(n, 16), m)
        _fp8_gemv[grid](
            x, weight, scale, out, n, k, x.stride(0), scale.stride(0), out.stride(0), block_k or k,
            BLOCKED=blocked, BLOCK_N=16, BLOCK_K=_tile_k(block_k, 128), num_warps=4,
        )  # fmt: skip
        return out
    xq, xs = quantize_activations(x, block_k)
    per_block = xs.shape[1] > 1  # else one scale per token, also for every block
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _fp8_gemm[grid](
        xq, xs, weight, scale, out, m, n, k, xq.stride(0), xs.stride(0), xs.stride(1) if per_block else 0,
        scale.stride(0), out.stride(0), block_k or k,
        BLOCKED=blocked, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=_tile_k(block_k, 128), num_warps=4,
    )  # fmt: skip
    return out
