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


class NormOfInput(NamedTuple):
    """An RMSNorm applied inside the GEMV of its input ``h`` (see ``triton_gemv.normed_gemv``)."""

    sumsq: torch.Tensor  # [M, parts], fp32: sums of h^2 over parts of each row (from residual_gemv)
    eps: float


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
