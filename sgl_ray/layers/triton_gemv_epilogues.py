"""Epilogues of the batch-1 GEMV (:mod:`sgl_ray.layers.triton_gemv`) and what they take: rotary with the KV-pool
store after the QKV projection, and the norm of an input whose producer wrote its sums of squares.

Imported only on CUDA (and by Triton's interpreter in tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class RotaryStore(NamedTuple):
    """What the QKV GEMV needs to rotate its q and k outputs and store k and v in the KV pool (see
    ``triton_gemv.qkv_rotary_store_gemv``)."""

    cos: torch.Tensor  # [M, 1, D], the two halves equal (NeoX layout), in the activation dtype
    sin: torch.Tensor
    loc: torch.Tensor  # [M] pool rows
    k_cache: torch.Tensor  # [slots, KVH, D]
    v_cache: torch.Tensor
    num_heads: int
    num_kv_heads: int
    # Per-head RMSNorm of q and k before the rotation (Qwen3): the norms' [D] weights, their eps, and int32 zeros,
    # one per q and k head, that the GEMV's programs count on (left zero again; see head_norm_rotary_store_epilogue)
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    norm_eps: float = 1e-6
    counters: torch.Tensor | None = None


class NormOfInput(NamedTuple):
    """An RMSNorm applied inside the GEMV of its input ``h`` (see ``triton_gemv.normed_gemv``)."""

    sumsq: torch.Tensor  # [M, parts], fp32: sums of h^2 over parts of each row (from residual_gemv)
    eps: float
    # the norm's scale g [K] where it is not folded into the consumer's weights (MoE blocks, whose router would
    # otherwise see the rounding of W diag(g)): the consumer multiplies its input by it (not normed_gemv)
    weight: torch.Tensor | None = None


@triton.jit
def rstd_of_parts(sq_row, num_parts, width, eps, SQ_BLOCK: tl.constexpr):
    """``1 / sqrt(mean(h^2) + eps)`` of a row whose sums of squares by parts are at ``sq_row`` [num_parts]."""
    offs = tl.arange(0, SQ_BLOCK)
    sq = tl.zeros([SQ_BLOCK], dtype=tl.float32)
    for p0 in range(0, num_parts, SQ_BLOCK):
        sq += tl.load(sq_row + p0 + offs, mask=p0 + offs < num_parts, other=0.0)
    return 1.0 / tl.sqrt(tl.sum(sq, axis=0) / width + eps)


@triton.jit
def rope_rotate(x1, x2, c, s):
    """NeoX rotation of the halves ``x1``/``x2`` (activation dtype) by ``c``/``s`` (fp32, broadcastable), rounded
    like torch's ``x * cos + cat(-x2, x1) * sin``: each product and the sum in the activation dtype."""
    dt = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    o1 = ((x1f * c).to(dt).to(tl.float32) + (-x2f * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2f * c).to(dt).to(tl.float32) + (x1f * s).to(dt).to(tl.float32)).to(dt)
    return o1, o2


@triton.jit
def head_rmsnorm(x1, x2, w_row, offs, eps, HALF: tl.constexpr):
    """RMSNorm of each head (row) of ``[x1 | x2]`` with the weight at ``w_row`` [2 * HALF], rounded like
    ``RMSNorm``: normalized in fp32, cast to the activation dtype, then times the weight in that dtype."""
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(w_row + offs, mask=offs < HALF, other=0.0)[None, :].to(tl.float32)
    w2 = tl.load(w_row + HALF + offs, mask=offs < HALF, other=0.0)[None, :].to(tl.float32)
    n1 = (w1 * (a * rstd).to(x1.dtype).to(tl.float32)).to(x1.dtype)
    n2 = (w2 * (b * rstd).to(x1.dtype).to(tl.float32)).to(x1.dtype)
    return n1, n2


@triton.jit
def head_norm_rotary_store_epilogue(
    Y, y, Cos, Sin, Loc, KCache, VCache, QNorm, KNorm, Counters, norm_eps, offs_m, mask_m, head, i0, stride_ym,
    stride_ct, stride_cache, num_heads, num_kv_heads, M_PAD: tl.constexpr, PAIRS: tl.constexpr,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """:func:`rotary_store_epilogue` with a per-head RMSNorm of q and k first, which needs the whole head: each
    program stores its outputs of a q or k head as they are, then counts itself done on the head's counter; the
    last of the head's programs reads the head back (from L2), norms, rotates and stores it (k into the cache
    too) and zeroes the counter for the next launch. The same bits as the GEMV then ``triton_ops.rotary_store``
    with norms. v heads take the plain epilogue."""
    if head >= num_heads + num_kv_heads:
        rotary_store_epilogue(
            Y, y, Cos, Sin, Loc, KCache, VCache, offs_m, mask_m, head, i0, stride_ym, stride_ct, stride_cache,
            num_heads, num_kv_heads, M_PAD, PAIRS, HALF,
        )  # fmt: skip
    else:
        x1, x2 = tl.split(tl.reshape(y.to(Y.dtype.element_ty), [M_PAD, PAIRS, 2]))
        offs_i = i0 + tl.arange(0, PAIRS)
        row = Y + (offs_m * stride_ym)[:, None] + head * (2 * HALF)
        tl.store(row + offs_i[None, :], x1, mask=mask_m[:, None])
        tl.store(row + HALF + offs_i[None, :], x2, mask=mask_m[:, None])
        tl.debug_barrier()  # every thread's stores before the release below
        done = tl.atomic_add(Counters + head, 1, sem="acq_rel")
        if done == HALF // PAIRS - 1:  # the head's last program: the whole head is in Y
            tl.store(Counters + head, 0)
            offs = tl.arange(0, BLOCK_D)
            mask = mask_m[:, None] & (offs < HALF)[None, :]
            a = tl.load(row + offs[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            b = tl.load(row + HALF + offs[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            is_q = head < num_heads
            n1, n2 = head_rmsnorm(a, b, QNorm if is_q else KNorm, offs, norm_eps, HALF)
            c = tl.load(Cos + (offs_m * stride_ct)[:, None] + offs[None, :], mask=mask, other=0.0)
            s = tl.load(Sin + (offs_m * stride_ct)[:, None] + offs[None, :], mask=mask, other=0.0)
            o1, o2 = rope_rotate(n1, n2, c.to(tl.float32), s.to(tl.float32))
            tl.store(row + offs[None, :], o1, mask=mask)
            tl.store(row + HALF + offs[None, :], o2, mask=mask)
            if not is_q:
                rows = (tl.load(Loc + offs_m, mask=mask_m, other=0).to(tl.int64) * stride_cache)[:, None]
                c_ptrs = KCache + rows + (head - num_heads) * (2 * HALF) + offs[None, :]
                tl.store(c_ptrs, o1, mask=mask)
                tl.store(c_ptrs + HALF, o2, mask=mask)


@triton.jit
def rotary_store_epilogue(
    Y, y, Cos, Sin, Loc, KCache, VCache, offs_m, mask_m, head, i0, stride_ym, stride_ct, stride_cache,
    num_heads, num_kv_heads, M_PAD: tl.constexpr, PAIRS: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """Store one program's QKV outputs (``PAIRS`` rotary pairs ``(i, i + HALF)`` of head ``head``, interleaved
    in ``y``) rotated where they are q or k, and k and v also into the KV cache rows ``Loc[m]``."""
    x1, x2 = tl.split(tl.reshape(y.to(Y.dtype.element_ty), [M_PAD, PAIRS, 2]))  # [M_PAD, PAIRS] each
    offs_i = i0 + tl.arange(0, PAIRS)
    mask = mask_m[:, None]
    if head < num_heads + num_kv_heads:  # q or k
        c = tl.load(Cos + (offs_m * stride_ct)[:, None] + offs_i[None, :], mask=mask, other=0.0)
        s = tl.load(Sin + (offs_m * stride_ct)[:, None] + offs_i[None, :], mask=mask, other=0.0)
        o1, o2 = rope_rotate(x1, x2, c.to(tl.float32), s.to(tl.float32))
    else:
        o1, o2 = x1, x2
    y_ptrs = Y + (offs_m * stride_ym)[:, None] + head * (2 * HALF) + offs_i[None, :]
    tl.store(y_ptrs, o1, mask=mask)
    tl.store(y_ptrs + HALF, o2, mask=mask)
    if head >= num_heads:  # k or v: into the pool too
        rows = (tl.load(Loc + offs_m, mask=mask_m, other=0).to(tl.int64) * stride_cache)[:, None]
        if head < num_heads + num_kv_heads:
            c_ptrs = KCache + rows + (head - num_heads) * (2 * HALF) + offs_i[None, :]
        else:
            c_ptrs = VCache + rows + (head - num_heads - num_kv_heads) * (2 * HALF) + offs_i[None, :]
        tl.store(c_ptrs, o1, mask=mask)
        tl.store(c_ptrs + HALF, o2, mask=mask)
