"""Triton segmented gather matmuls (SGMV, as in Punica / S-LoRA) for batched heterogeneous LoRA on CUDA.

Two kernels per projection, each over the batch's adapter segments (see :class:`~sgl_ray.lora.backend.LoRABatch`)::

    shrink, grid (ceil(max_seg_len / BLOCK_M), ceil(N / BLOCK_N) * splits, G):
        part[split, rows of segment g, n-block] = x[rows, K range] @ A[slot_g, :, K range].T
                                                         A: [S, N, K], x: [T, K] -> part: [splits, T, N] fp32
    expand, grid (ceil(max_seg_len / BLOCK_M), ceil(O / BLOCK_O), G):
        out[rows of segment g, o-block] += h[rows] @ B[slot_g].T,  h = sum over splits of part
                                                         B: [S, O, N] -> out: [T, O]

The shrink's reduction (K, the hidden size) is long and its output (N, the rank) tiny: a decode batch has a few
tokens per segment, so without the split over K one program per segment would walk all of K alone. The expand sums
the splits as it loads them, so the split needs neither atomics nor a zeroed buffer. Segments are disjoint token
ranges, so the in-place add to ``out`` needs no atomics either; rows outside every segment (base-model requests)
are never touched. Products accumulate in fp32 (full IEEE precision for fp32 inputs); ``h`` is rounded to the
activation dtype before the expand, as a two-GEMM torch implementation would.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_ray.lora.backend import LoRABackend


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _shrink_kernel(
    x_ptr, w_ptr, part_ptr, seg_start, seg_len, seg_slot, K, N, n_blocks, k_per_split,
    stride_xt, stride_xk, stride_ws, stride_wn, stride_wk, stride_ps, stride_pt, stride_pn,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """part[split, rows of segment g, n-block] = x[rows, K range of split] @ A[slot_g, n-block, K range].T"""
    pid_m = tl.program_id(0)
    pid_nk = tl.program_id(1)
    g = tl.program_id(2)
    length = tl.load(seg_len + g)
    if pid_m * BLOCK_M >= length:
        return
    split = pid_nk // n_blocks
    pid_n = pid_nk % n_blocks
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
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_hi
        x = tl.load(x_base + k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + k[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += _dot(x, w.to(x.dtype), IEEE)  # [BLOCK_M, BLOCK_N]
    part = part_ptr + split * stride_ps + rows[:, None] * stride_pt + offs_n[None, :] * stride_pn
    tl.store(part, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _expand_kernel(
    part_ptr, w_ptr, out_ptr, seg_start, seg_len, seg_slot, N, n_out, splits,
    stride_ps, stride_pt, stride_pn, stride_ws, stride_wo, stride_wn, stride_ot, stride_oo,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[rows of segment g, o-block] += h[rows] @ B[slot_g, o-block].T, h = the sum of the shrink's splits
    (rounded to the activation dtype)."""
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    g = tl.program_id(2)
    length = tl.load(seg_len + g)
    if pid_m * BLOCK_M >= length:
        return
    start = tl.load(seg_start + g).to(tl.int64)
    slot = tl.load(seg_slot + g).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < length
    o_mask = offs_o < n_out
    rows = start + offs_m
    dt = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        hn_mask = m_mask[:, None] & (n < N)[None, :]
        h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(splits):
            h += tl.load(part_ptr + s * stride_ps + rows[:, None] * stride_pt + n[None, :] * stride_pn,
                         mask=hn_mask, other=0.0)  # fmt: skip
        w_ptrs = w_ptr + slot * stride_ws + offs_o[None, :] * stride_wo + n[:, None] * stride_wn
        w = tl.load(w_ptrs, mask=(n < N)[:, None] & o_mask[None, :], other=0.0)
        acc += _dot(h.to(dt), w.to(dt), IEEE)  # [BLOCK_M, BLOCK_O]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_o[None, :] * stride_oo
    mask = m_mask[:, None] & o_mask[None, :]
    acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(dt), mask=mask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


_SPLIT_K = 512  # shrink: K elements per program when the batch is small
_SPLIT_MAX_TOKENS = 1024  # above this many tokens the segments alone give enough programs


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, batch) -> None:
    """``out[rows of g] += (x[rows of g] @ A[slot of g].T) @ B[slot of g].T`` for every segment g (other rows
    untouched); ``batch`` is a :class:`LoRABatch` or :class:`GraphLoRABatch`."""
    t, k = x.shape
    n, o = a.shape[1], b.shape[1]
    block_m = _block(batch.max_seg_len, 16, 64)
    block_k = _block(k, 16, 128 if x.element_size() <= 2 else 64)
    block_n = _block(n, 16, 128)
    splits = triton.cdiv(k, _SPLIT_K) if t <= _SPLIT_MAX_TOKENS else 1
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    part = torch.empty((splits, t, n), dtype=torch.float32, device=x.device)
    m_blocks = triton.cdiv(batch.max_seg_len, block_m)
    n_blocks = triton.cdiv(n, block_n)
    ieee = x.dtype == torch.float32
    segs = (batch.seg_start, batch.seg_len, batch.seg_slot)
    _shrink_kernel[(m_blocks, n_blocks * splits, batch.num_segments)](
        x, a, part, *segs, k, n, n_blocks, k_per_split,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
        part.stride(0), part.stride(1), part.stride(2),
        IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    block_o = _block(o, 16, 128)
    _expand_kernel[(m_blocks, triton.cdiv(o, block_o), batch.num_segments)](
        part, b, out, *segs, n, o, splits,
        part.stride(0), part.stride(1), part.stride(2), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1),
        IEEE=ieee, BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_N=_block(n, 16, 64),
    )  # fmt: skip


class TritonLoRABackend(LoRABackend):
    """Shrink (split over K for small batches) then expand, two launches per projection; no host sync, no
    gather copies."""

    supports_cuda_graph = True

    def apply(self, x, out, a, b, batch):
        lora_delta(x, a, b, out, batch)
