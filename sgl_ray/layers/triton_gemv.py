"""Triton matrix-vector products for decode steps: ``y = x W^T (+ b)`` with ``x`` [M, K], M small (1 in use).

At batch 1 a decode step is a chain of GEMVs that only stream their weights: the whole step is bounded by how
fast the weights come in from memory. One program owns ``BLOCK_N`` output columns (rows of ``W``, each read
contiguously) and walks K in ``BLOCK_K`` chunks, keeping ``num_stages`` chunks in flight; the products of all
M rows accumulate in fp32 registers, lane by lane, and are summed across the chunk once at the end, so the loop
body is loads and fused multiply-adds only.

Imported only on CUDA (through :func:`sgl_ray.layers.cuda_ops.cuda_ops`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sgl_ray.layers.triton_pdl import launch_args, pdl_enter, use_pdl

MAX_ROWS = 1  # from 2 rows on cuBLAS was faster on an H200 (8B shapes), and from 4 by far


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    lane_acc: bool = True  # sum across the chunk once at the end (else after every chunk: fewer registers)


# The best of 17 configurations on an H200 over the 8B shapes at batch 1 (QKV, O, gate/up, down, LM head):
# 15.3, 11.3, 60.1, 33.1, 247.6 µs against cuBLAS's 15.8, 13.6, 57.8, 33.1, 251.3 µs.
DEFAULT_CONFIG = GemvConfig(block_n=4, block_k=512, num_warps=2, num_stages=4)


@triton.jit
def _accumulate(acc, w, x, LANE_ACC: tl.constexpr):
    """Add the products of a weight tile w [BLOCK_N, BLOCK_K] and the rows x [M_PAD, BLOCK_K] to acc."""
    prod = w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]  # [M_PAD, BLOCK_N, BLOCK_K]
    if LANE_ACC:
        return acc + prod
    else:
        return acc + tl.sum(prod, axis=2)


@triton.jit
def _gemv_kernel(
    X, W, Bias, Y, M, N, K, stride_xm, stride_wn, stride_ym,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, LANE_ACC: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, M_PAD)
    mask_n = offs_n < N
    mask_m = offs_m < M
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]  # [M_PAD, BLOCK_K]
    if LANE_ACC:
        acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    k_start = 0
    if USE_PDL:
        # Launched while the previous kernel may still run (see triton_pdl): the first weight tile is read
        # before waiting for it, since no kernel writes weights; x, and the output, only after.
        in_k = offs_k < K
        w = tl.load(w_ptrs, mask=mask_n[:, None] & in_k[None, :], other=0.0)
        pdl_enter(USE_PDL)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & in_k[None, :], other=0.0)
        acc = _accumulate(acc, w, x, LANE_ACC)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            in_k = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=mask_n[:, None] & in_k[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mask_m[:, None] & in_k[None, :], other=0.0)
        acc = _accumulate(acc, w, x, LANE_ACC)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if LANE_ACC:
        y = tl.sum(acc, axis=2)  # [M_PAD, BLOCK_N]
    else:
        y = acc
    if HAS_BIAS:
        y += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`gemv` takes this product: up to ``MAX_ROWS`` rows of a half-precision input against a
    weight of the same dtype with unit stride along K."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
    )


def gemv(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], unit stride along K
    bias: torch.Tensor | None = None,  # [N]
    config: GemvConfig = DEFAULT_CONFIG,
    pdl: bool | None = None,  # None: wherever the device supports it
) -> torch.Tensor:  # [M, N]
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    pdl = use_pdl(x) if pdl is None else pdl
    block_k = min(config.block_k, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        M_PAD=triton.next_power_of_2(m), BLOCK_N=config.block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0, LANE_ACC=config.lane_acc, USE_PDL=pdl, num_warps=config.num_warps,
        num_stages=config.num_stages, **launch_args(pdl),
    )  # fmt: skip
    return out
