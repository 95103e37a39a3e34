"""Triton kernels for ``x @ W.T`` with ``W`` an FP8 e4m3 matrix of :mod:`.fp8` (CUDA with compute capability
8.9 or more; the tests also run them under Triton's CPU interpreter).

- W8A8 with per-row weight scales: ``torch._scaled_mm`` with row-wise scales where torch and the device have it
  (bf16 outputs), else :func:`_fp8_gemm`.
- :func:`_fp8_gemm` (W8A8): ``x`` arrives quantized to e4m3 with float32 scales per token, or per token and
  ``block_k`` columns when the weight has block scales. Per-row weight scales: the FP8 dot accumulates all of K in
  float32 and the tile is scaled once by ``sx[m] * sw[n]``; block scales: each K tile (inside one block) is scaled
  by ``sx[m, kb] * sw[n, kb]`` as it is added.
- :func:`_fp8_gemv` (weight-only, ``M <= GEMV_MAX_ROWS``): the e4m3 weights are widened in registers and
  multiplied by the 16-bit activations, no activation quantization (decode steps read each weight byte once).
  The bf16 GEMV's shape: many small programs streaming a few rows each, products kept lane by lane and summed
  once at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sgl_ray.layers import gemv_overrides
from sgl_ray.layers.quantization.fp8 import quantize_fp8_groups, quantize_fp8_rows
from sgl_ray.layers.triton_pdl import launch_args, pdl_enter, use_pdl

GEMV_MAX_ROWS = 4
# Per-row scales on more rows: the GEMM through torch._scaled_mm (cuBLASLt) where it takes row-wise scales; else,
# and for block scales, the Triton GEMM.
USE_SCALED_MM = True


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
    BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K  # [BN, 1]
    pdl_enter(USE_PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # lane by lane, summed once at the end
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptr + m * stride_xm + kk).to(tl.float32)
        else:
            k_ok = kk < K
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + m * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)
        part = w.to(tl.float32) * x[None, :]  # [BN, BK]
        if BLOCKED:  # the tile lies in one block of columns
            part = part * tl.load(ws_ptr + rn * stride_wsn + k0 // block_k, mask=n_ok, other=0.0)[:, None]
        acc += part
    y = tl.sum(acc, axis=1)
    if not BLOCKED:
        y = y * tl.load(ws_ptr + rn * stride_wsn, mask=n_ok, other=0.0)
    tl.store(o_ptr + m * stride_om + rn, y.to(o_ptr.dtype.element_ty), mask=n_ok)


class Fp8GemvConfig(NamedTuple):
    block_n: int  # rows of W per program
    block_k: int  # columns per loop step (with block scales: at most, and dividing, the block's width)
    num_warps: int
    num_stages: int


# Launch shapes of the one-row GEMV by weight shape (N, K), from `python -m sgl_ray.bench.quant_kernels --tune`;
# other shapes take the default.
GEMV_TABLE: dict[tuple[int, int], Fp8GemvConfig] = {}
DEFAULT_GEMV = Fp8GemvConfig(block_n=4, block_k=1024, num_warps=2, num_stages=4)


def gemv_config(n: int, k: int) -> Fp8GemvConfig:
    """The one-row GEMV's launch shape for an ``[N, K]`` weight: a saved measurement
    (:mod:`sgl_ray.layers.gemv_overrides`), else the table's entry, else the default."""
    saved = gemv_overrides.tuned("fp8", n, k)
    return Fp8GemvConfig(*saved) if saved else GEMV_TABLE.get((n, k), DEFAULT_GEMV)


@triton.jit
def _quantize_groups(
    x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, groups, GROUP: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """One program per (row, group of ``GROUP`` columns): scale = max|x| / 448 (at least 1e-12), q = x / scale
    clamped to e4m3's range, as ``fp8.quantize_fp8_rows`` computes them (correctly rounded division)."""
    m = tl.program_id(0)
    gi = tl.program_id(1)
    r = tl.arange(0, BLOCK)
    cols = gi * GROUP + r
    mask = (r < GROUP) & (cols < K)
    x = tl.load(x_ptr + m * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    tl.store(q_ptr + m * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + m * groups + gi, scale)


def quantize_activations(x: torch.Tensor, block_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] -> ``(fp8 [M, K], float32 scales)``: [M, K / block_k] when the weight has block scales and
    ``block_k`` divides K, else one scale per token [M, 1]. On CUDA one kernel; elsewhere torch ops (the same
    values)."""
    m, k = x.shape
    group = block_k if block_k is not None and k % block_k == 0 else k
    if not x.is_cuda:
        return quantize_fp8_groups(x, group) if group != k else quantize_fp8_rows(x)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    groups = k // group
    scale = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(group)
        _quantize_groups[(m, groups)](
            x, q, scale, k, x.stride(0), q.stride(0), groups, GROUP=group, BLOCK=block,
            num_warps=max(1, min(16, block // 512)),
        )  # fmt: skip
    return q, scale


_SCALED_MM_ROWWISE: bool | None = None  # whether torch._scaled_mm takes row-wise scales here (tried once)


def _scaled_mm(
    xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, out_dtype
) -> torch.Tensor | None:
    """``(xq * xs) @ (w * ws).T`` through ``torch._scaled_mm`` with per-token and per-row scales (cuBLASLt FP8
    tensor cores), or None where this torch or device cannot."""
    global _SCALED_MM_ROWWISE
    if _SCALED_MM_ROWWISE is False or out_dtype != torch.bfloat16 or w.shape[0] % 16 or w.shape[1] % 16:
        return None
    try:
        out = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=out_dtype)
    except (RuntimeError, TypeError, ValueError):
        _SCALED_MM_ROWWISE = False
        return None
    _SCALED_MM_ROWWISE = True
    return out


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
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_k: int | None,
    w8a8: bool | None = None,
    config: Fp8GemvConfig | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for ``x`` [M, K] and the FP8 matrix ``weight`` [N, K] (e4m3) with float32 ``scale`` [N, 1]
    (per row) or [N, ceil(K / block_k)]. ``w8a8``: the GEMM on quantized activations (default: for more than
    ``GEMV_MAX_ROWS`` rows) or the weight-only GEMV (launch shape ``config``, default :func:`gemv_config`).
    Returns [M, N] in ``x``'s dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    blocked = block_k is not None
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if not (m > GEMV_MAX_ROWS if w8a8 is None else w8a8):
        cfg = config or gemv_config(n, k)
        tile = min(_tile_k(block_k, cfg.block_k), triton.next_power_of_2(k))
        pdl = use_pdl(x)
        grid = (triton.cdiv(n, cfg.block_n), m)
        _fp8_gemv[grid](
            x, weight, scale, out, n, k, x.stride(0), scale.stride(0), out.stride(0), block_k or k,
            BLOCKED=blocked, BLOCK_N=cfg.block_n, BLOCK_K=tile, EVEN_K=k % tile == 0, USE_PDL=pdl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_args(pdl),
        )  # fmt: skip
        return out
    xq, xs = quantize_activations(x, block_k)
    if not blocked and x.is_cuda and USE_SCALED_MM:
        done = _scaled_mm(xq, xs, weight, scale, x.dtype)
        if done is not None:
            return done
    per_block = xs.shape[1] > 1  # else one scale per token, also for every block
    if m <= 64:
        block_m, block_n, warps, stages = (16 if m <= 16 else 32 if m <= 32 else 64), 64, 4, 3
    else:
        block_m, block_n, warps, stages = 128, 128, 8, 3
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm[grid](
        xq, xs, weight, scale, out, m, n, k, xq.stride(0), xs.stride(0), xs.stride(1) if per_block else 0,
        scale.stride(0), out.stride(0), block_k or k,
        BLOCKED=blocked, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_tile_k(block_k, 128),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
