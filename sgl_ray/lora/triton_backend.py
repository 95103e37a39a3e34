"""Triton segmented gather matmuls (SGMV, as in Punica / S-LoRA) for batched heterogeneous LoRA on CUDA.

Two kernels per projection, each over the batch's adapter segments (see :class:`~sgl_ray.lora.backend.LoRABatch`)::

    shrink, grid (ceil(max_seg_len / BLOCK_M), ceil(N / BLOCK_N), G):
        h[rows of segment g, n-block]  = x[rows] @ A[slot_g].T           A: [S, N, K], x: [T, K] -> h: [T, N]
    expand, grid (ceil(max_seg_len / BLOCK_M), ceil(O / BLOCK_O), G):
        out[rows of segment g, o-block] += h[rows] @ B[slot_g].T         B: [S, O, N] -> out: [T, O]

Each program reads one slot's weights once per token block; segments are disjoint token ranges, so the in-place
add to ``out`` needs no atomics. Rows outside every segment (base-model requests) are never touched. Products
accumulate in fp32 (full IEEE precision for fp32 inputs); ``h`` is kept in the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_ray.lora.backend import LoRABackend, LoRABatch


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sgmv_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [S, N, K]: out[t, n] (+)= sum_k x[t, k] * w[slot, n, k]
    out_ptr,  # [T, N]
    seg_start,
    seg_len,
    seg_slot,
    K,
    N,
    stride_xt,
    stride_xk,
    stride_ws,
    stride_wn,
    stride_wk,
    stride_ot,
    stride_on,
    ACCUMULATE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    length = tl.load(seg_len + g)
    if pid_m * BLOCK_M >= length:
        return
    start = tl.load(seg_start + g).to(tl.int64)
    slot = tl.load(seg_slot + g).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < length
    n_mask = offs_n < N
    rows = start + offs_m
    x_base = x_ptr + rows[:, None] * stride_xt
    w_base = w_ptr + slot * stride_ws + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_base + k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + k[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += _dot(x, w.to(x.dtype), IEEE)  # [BLOCK_M, BLOCK_N]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on
    mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def sgmv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, batch: LoRABatch, accumulate: bool) -> None:
    """``out[rows of g] (+)= x[rows of g] @ w[slot of g].T`` for every segment g (other rows untouched)."""
    k, n = x.shape[1], w.shape[1]
    block_m = _block(batch.max_seg_len, 16, 64)
    block_n = _block(n, 16, 128)
    block_k = _block(k, 16, 128 if x.element_size() <= 2 else 64)
    grid = (triton.cdiv(batch.max_seg_len, block_m), triton.cdiv(n, block_n), batch.num_segments)
    _sgmv_kernel[grid](
        x,
        w,
        out,
        batch.seg_start,
        batch.seg_len,
        batch.seg_slot,
        k,
        n,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        ACCUMULATE=accumulate,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


class TritonLoRABackend(LoRABackend):
    """Shrink then expand with :func:`sgmv`; no host sync, no gather copies."""

    def apply(self, x, out, a, b, batch):
        h = torch.empty(x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)  # [T, N]
        sgmv(x, a, h, batch, accumulate=False)
        sgmv(h, b, out, batch, accumulate=True)
