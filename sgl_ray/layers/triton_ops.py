"""Fused Triton kernels for the small per-layer ops on CUDA: RMSNorm with the residual add, SiLU-and-mul, rotary
(and, re-exported, the batch-1 GEMVs of :mod:`sgl_ray.layers.triton_gemv`, plain and fused with RMSNorm or
SiLU-and-mul).

At small batch a decode step is a few large GEMVs plus ~20 tiny elementwise kernels per layer; each tiny kernel
costs 1-3 µs of GPU time however little it does. These kernels do each op in one launch, with the same rounding as
the torch path (each torch op rounds to the activation dtype; so does each step here), so outputs match it.

Imported only on CUDA (through :func:`sgl_ray.layers.cuda_ops.cuda_ops`): CPU installs have no Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_ray.layers.triton_gemv import (
    NormOfInput,
    RotaryStore,
    gemv,
    normed_gemv,
    qkv_rotary_store_gemv,
    residual_gemv,
    rmsnorm_gemv,
    rotary_store_supports,
    silu_mul_gemv,
)
from sgl_ray.layers.triton_gemv import supports as gemv_supports
from sgl_ray.layers.triton_gemv_epilogues import head_rmsnorm, rope_rotate
from sgl_ray.layers.triton_pdl import launch_args, pdl_enter, use_pdl

__all__ = [
    "NormOfInput",
    "RotaryStore",
    "gemv",
    "gemv_supports",
    "normed_gemv",
    "qkv_rotary_store_gemv",
    "residual_gemv",
    "rmsnorm",
    "rmsnorm_gemv",
    "rotary",
    "rotary_store",
    "rotary_store_supports",
    "silu_and_mul",
    "silu_mul_gemv",
]


@triton.jit
def _rmsnorm_kernel(
    X, R, W, Out, ROut, stride_x, stride_r, stride_o, stride_ro, n, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(
            x.dtype
        )
        tl.store(ROut + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
    y = (xf * rstd).to(x.dtype)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(Out + row * stride_o + offs, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=mask)


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * norm(x)`` or, with ``residual``, ``(weight * norm(x + residual), x + residual)``; x: [T, n]."""
    t, n = x.shape
    out = torch.empty_like(x)
    r_out = torch.empty_like(x) if residual is not None else out
    r = residual if residual is not None else x
    if t:
        pdl = use_pdl(x)
        _rmsnorm_kernel[(t,)](
            x, r, weight, out, r_out, x.stride(0), r.stride(0), out.stride(0), r_out.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n), USE_PDL=pdl,
            num_warps=8 if n >= 4096 else 4, **launch_args(pdl),
        )  # fmt: skip
    return out if residual is None else (out, r_out)


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + n + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(Out + row * stride_o + offs, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]``: [T, 2n] -> [T, n]."""
    t, n2 = x.shape
    n = n2 // 2
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    block = 1024
    if t:
        pdl = use_pdl(x)
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](
            x, out, x.stride(0), out.stride(0), n, BLOCK=block, USE_PDL=pdl, **launch_args(pdl)
        )
    return out


@triton.jit
def _rotate_halves(x1, x2, cos_row, sin_row, offs, HALF: tl.constexpr):
    """NeoX rotation of the halves ``x1``/``x2`` by one token's cos/sin row, rounded like torch's
    ``x * cos + cat(-x2, x1) * sin``: each product and the sum in the activation dtype."""
    c = tl.load(cos_row + offs, mask=offs < HALF, other=0.0)[None, :].to(tl.float32)
    s = tl.load(sin_row + offs, mask=offs < HALF, other=0.0)[None, :].to(tl.float32)
    return rope_rotate(x1, x2, c, s)


@triton.jit
def _rotary_kernel(
    X, Cos, Sin, Out, stride_xt, stride_xh, stride_ct, stride_ot, stride_oh, num_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (offs < HALF)[None, :]
    x_row = X + t * stride_xt + heads[:, None] * stride_xh + offs[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0)
    o1, o2 = _rotate_halves(x1, x2, Cos + t * stride_ct, Sin + t * stride_ct, offs, HALF)
    o_row = Out + t * stride_ot + heads[:, None] * stride_oh + offs[None, :]
    tl.store(o_row, o1, mask=mask)
    tl.store(o_row + HALF, o2, mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, heads, D] (any strides with a unit last stride) by ``cos``/``sin`` [T, 1, D] (already in
    ``x``'s dtype; the two halves equal, NeoX layout); returns a contiguous [T, heads, D]."""
    t, h, d = x.shape
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    block_h = min(16, triton.next_power_of_2(h))
    if t:
        pdl = use_pdl(x)
        _rotary_kernel[(t, triton.cdiv(h, block_h))](
            x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1), h,
            HALF=d // 2, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d // 2), USE_PDL=pdl, **launch_args(pdl),
        )  # fmt: skip
    return out


@triton.jit
def _rotary_store_kernel(
    QKV, Cos, Sin, QOut, KOut, KCache, VCache, Loc, QNorm, KNorm, eps,
    stride_qkv, stride_ct, stride_qo, stride_ko, stride_cache,
    num_heads, num_kv_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    # program (t, head block) over the H query, KVH key and KVH value heads of token t's QKV row
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_D)
    d_mask = (offs < HALF)[None, :]
    is_q = heads < num_heads
    is_k = (heads >= num_heads) & (heads < num_heads + num_kv_heads)
    is_v = (heads >= num_heads + num_kv_heads) & (heads < num_heads + 2 * num_kv_heads)
    x_row = QKV + t * stride_qkv + heads[:, None] * (2 * HALF) + offs[None, :]
    in_mask = (is_q | is_k | is_v)[:, None] & d_mask
    x1 = tl.load(x_row, mask=in_mask, other=0.0)
    x2 = tl.load(x_row + HALF, mask=in_mask, other=0.0)
    if NORM:  # per-head q/k RMSNorm (Qwen3) before the rotation; a program's heads are all q, or k, or v ...
        qn1, qn2 = head_rmsnorm(x1, x2, QNorm, offs, eps, HALF)
        kn1, kn2 = head_rmsnorm(x1, x2, KNorm, offs, eps, HALF)
        r1 = tl.where(is_q[:, None], qn1, tl.where(is_k[:, None], kn1, x1))  # ... or a mix at the edges
        r2 = tl.where(is_q[:, None], qn2, tl.where(is_k[:, None], kn2, x2))
        o1, o2 = _rotate_halves(r1, r2, Cos + t * stride_ct, Sin + t * stride_ct, offs, HALF)
    else:
        o1, o2 = _rotate_halves(x1, x2, Cos + t * stride_ct, Sin + t * stride_ct, offs, HALF)
    q_mask = is_q[:, None] & d_mask
    q_row = QOut + t * stride_qo + heads[:, None] * (2 * HALF) + offs[None, :]
    tl.store(q_row, o1, mask=q_mask)
    tl.store(q_row + HALF, o2, mask=q_mask)
    loc = tl.load(Loc + t).to(tl.int64)
    k_mask = is_k[:, None] & d_mask
    kh = (heads - num_heads)[:, None] * (2 * HALF) + offs[None, :]
    tl.store(KOut + t * stride_ko + kh, o1, mask=k_mask)
    tl.store(KOut + t * stride_ko + kh + HALF, o2, mask=k_mask)
    tl.store(KCache + loc * stride_cache + kh, o1, mask=k_mask)
    tl.store(KCache + loc * stride_cache + kh + HALF, o2, mask=k_mask)
    v_mask = is_v[:, None] & d_mask
    vh = (heads - num_heads - num_kv_heads)[:, None] * (2 * HALF) + offs[None, :]
    tl.store(VCache + loc * stride_cache + vh, x1, mask=v_mask)
    tl.store(VCache + loc * stride_cache + vh + HALF, x2, mask=v_mask)


def rotary_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    loc: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on the query and key heads of ``qkv`` [T, (H + 2 KVH) D] (unit last stride) plus the KV-cache
    store, in one launch: the rotated keys and the values go to ``k_cache``/``v_cache`` [slots, KVH, D] rows
    ``loc`` [T]. With ``q_norm``/``k_norm`` ([D] weights, Qwen3), each query and key head is RMS-normed first.
    Returns the rotated q [T, H, D] and k [T, KVH, D] (contiguous)."""
    t = qkv.shape[0]
    d = k_cache.shape[-1]
    q = torch.empty((t, num_heads, d), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, num_kv_heads, d), dtype=qkv.dtype, device=qkv.device)
    total = num_heads + 2 * num_kv_heads
    norm = q_norm is not None
    block_h = min(16, triton.next_power_of_2(total))
    if t:
        pdl = use_pdl(qkv)
        assert norm == (k_norm is not None), "q and k norms go together"
        _rotary_store_kernel[(t, triton.cdiv(total, block_h))](
            qkv, cos, sin, q, k, k_cache, v_cache, loc, q_norm if norm else qkv, k_norm if norm else qkv, eps,
            qkv.stride(0), cos.stride(0), q.stride(0), k.stride(0), k_cache.stride(0), num_heads, num_kv_heads,
            HALF=d // 2, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d // 2), USE_PDL=pdl, NORM=norm,
            **launch_args(pdl),
        )  # fmt: skip
    return q, k
