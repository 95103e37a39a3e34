"""Grouped-GEMM path of the Triton MoE backend: the experts over blocks of pairs sorted by expert.

After :func:`sgl_ray.layers.moe.triton_align.sort_pairs`, every block of ``BLOCK_M`` rows of ``sorted_ids``
belongs to one local expert (``block_expert``). Three launches::

    gemm1:   h[p] = act(x[p // k] @ w13[e].T + b13[e])        [T*k, I] in x.dtype, rows of local pairs only
             gate and up tiles of the same rows in one program (two dots), the activation in the epilogue
    gemm2:   y[p] = (h[p] @ w2[e].T + b2[e]) * weight[p]      [T*k, H] in x.dtype (rounded once, as the
             reference rounds its expert output), or fp32 atomics into out32[p // k] (``ATOMIC``)
    combine: out[t] = sum_j y[t*k + j] over the local pairs    fp32 sums, one store in x.dtype

Rows of pairs this rank does not compute are never written and never read (every reader masks them), padding
rows (sentinel ``num_pairs``) likewise; programs of row blocks past ``num_padded`` return at once. Grids are
sized by the static bound on blocks, so nothing depends on the routing on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from sgl_ray.layers.moe.base import Activation, ExpertWeights
from sgl_ray.layers.moe.triton_align import SortedPairs
from sgl_ray.layers.moe.triton_configs import GemmConfig

SILU, SWIGLUOAI = 0, 1
_COMBINE_BLOCK = 1024


def activation_code(activation: Activation) -> int:
    return SILU if activation.kind == "silu" else SWIGLUOAI


@triton.jit
def act_fn(gate, up, ACT: tl.constexpr, alpha, limit):
    """The expert activation of fp32 ``gate`` and ``up`` (already rounded to the activation dtype)."""
    if ACT == 0:
        return gate / (1.0 + tl.exp(-gate)) * up
    else:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        return g / (1.0 + tl.exp(-alpha * g)) * (u + 1.0)


@triton.jit
def _block_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program -> (row block, column block), ``GROUP_M`` row blocks per column sweep (L2 reuse of weights)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit(do_not_specialize=["num_pairs", "num_m"])
def _gemm_gate_up_kernel(
    X, W13, B13, Hout, SortedIds, BlockExpert, NumPadded, num_pairs, num_m, top_k, inter, hidden,
    stride_xt, stride_we, stride_wn, stride_be, stride_ht, alpha, limit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _block_of(tl.program_id(0), num_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    pair = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_ok = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = X + token[:, None] * stride_xt + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    # [BLOCK_K, BLOCK_N] tiles; rows past I wrap onto valid ones (never stored): weight loads stay unmasked
    g_ptrs = W13 + e * stride_we + (offs_n % inter)[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            wg = tl.load(g_ptrs)
            wu = tl.load(u_ptrs)
        else:
            in_k = offs_k < hidden - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & in_k[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=in_k[:, None], other=0.0)
            wu = tl.load(u_ptrs, mask=in_k[:, None], other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    n_ok = offs_n < inter
    if HAS_BIAS:
        acc_g += tl.load(B13 + e * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(B13 + e * stride_be + inter + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dtype = Hout.dtype.element_ty
    h = act_fn(acc_g.to(dtype).to(tl.float32), acc_u.to(dtype).to(tl.float32), ACT, alpha, limit)
    h_ptrs = Hout + pair.to(tl.int64)[:, None] * stride_ht + offs_n[None, :]
    tl.store(h_ptrs, h.to(dtype), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs", "num_m"])
def _gemm_down_kernel(
    Hin, W2, B2, Y, RouteW, SortedIds, BlockExpert, NumPadded, num_pairs, num_m, top_k, hidden, inter,
    stride_ht, stride_we, stride_wn, stride_be, stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _block_of(tl.program_id(0), num_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    pair = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_ok = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = Hin + pair.to(tl.int64)[:, None] * stride_ht + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = W2 + e * stride_we + (offs_n % hidden)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            in_k = offs_k < inter - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & in_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    n_ok = offs_n < hidden
    if HAS_BIAS:
        acc += tl.load(B2 + e * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * tl.load(RouteW + pair, mask=row_ok, other=0.0)[:, None]
    out_mask = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:  # Y is the fp32 [T, H] sum, zeroed before
        token = (pair // top_k).to(tl.int64)
        tl.atomic_add(Y + token[:, None] * stride_yt + offs_n[None, :], acc, mask=out_mask)
    else:
        y_ptrs = Y + pair.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=out_mask)


@triton.jit
def _combine_kernel(
    Y, Out, Ids, first_expert, num_local, hidden, stride_yt, stride_ot,
    TOP_K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(Ids + t * TOP_K + j) - first_expert
        bound = tl.where((e >= 0) & (e < num_local), hidden, 0)  # nothing of a pair not on this rank
        acc += tl.load(Y + (t * TOP_K + j) * stride_yt + offs, mask=offs < bound, other=0.0).to(tl.float32)
    tl.store(Out + t * stride_ot + offs, acc.to(Out.dtype.element_ty), mask=offs < hidden)


def _launch_opts(tile: GemmConfig) -> dict:
    return dict(
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip


def gate_up(
    x: torch.Tensor, weights: ExpertWeights, sorted_pairs: SortedPairs, top_k: int, block_m: int,
    tile: GemmConfig, empty: Callable[..., torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """``h`` [T * k, I] in x.dtype: the activated gate/up projection of every local pair (other rows unset)."""
    w13, b13, act = weights.w13, weights.b13, weights.activation
    inter, hidden = w13.shape[1] // 2, w13.shape[2]
    num_pairs = x.shape[0] * top_k
    h = empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    grid = (sorted_pairs.max_blocks * triton.cdiv(inter, tile.block_n),)
    _gemm_gate_up_kernel[grid](
        x, w13, b13 if b13 is not None else w13, h, *sorted_pairs[:3], num_pairs, sorted_pairs.max_blocks,
        top_k, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1),
        b13.stride(0) if b13 is not None else 0, h.stride(0), act.alpha, act.limit,
        BLOCK_M=block_m, EVEN_K=hidden % tile.block_k == 0, HAS_BIAS=b13 is not None,
        ACT=activation_code(act), PRECISION=_precision(x.dtype), **_launch_opts(tile),
    )  # fmt: skip
    return h


def down_combine(
    h: torch.Tensor, weights: ExpertWeights, route_weights: torch.Tensor, ids: torch.Tensor,
    sorted_pairs: SortedPairs, first_expert: int, block_m: int, tile: GemmConfig, atomic: bool,
    empty: Callable[..., torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """``out`` [T, H] in h.dtype: the down projection of every local pair, weighted and summed per token."""
    w2, b2 = weights.w2, weights.b2
    num_local, hidden, inter = w2.shape
    tokens, top_k = ids.shape
    num_pairs = tokens * top_k
    if atomic:
        y = torch.zeros((tokens, hidden), dtype=torch.float32, device=h.device)
    else:
        y = empty((num_pairs, hidden), dtype=h.dtype, device=h.device)
    grid = (sorted_pairs.max_blocks * triton.cdiv(hidden, tile.block_n),)
    _gemm_down_kernel[grid](
        h, w2, b2 if b2 is not None else w2, y, route_weights, *sorted_pairs[:3], num_pairs,
        sorted_pairs.max_blocks, top_k, hidden, inter, h.stride(0), w2.stride(0), w2.stride(1),
        b2.stride(0) if b2 is not None else 0, y.stride(0),
        BLOCK_M=block_m, EVEN_K=inter % tile.block_k == 0, HAS_BIAS=b2 is not None, ATOMIC=atomic,
        PRECISION=_precision(h.dtype), **_launch_opts(tile),
    )  # fmt: skip
    if atomic:
        return y.to(h.dtype)
    out = empty((tokens, hidden), dtype=h.dtype, device=h.device)
    block = min(_COMBINE_BLOCK, triton.next_power_of_2(hidden))
    _combine_kernel[(tokens, triton.cdiv(hidden, block))](
        y, out, ids, first_expert, num_local, hidden, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK=block,
        num_warps=4,
    )  # fmt: skip
    return out


def _precision(dtype: torch.dtype) -> str:
    """fp32 products in full precision, as the torch reference computes them (tf32 would be ~1e-3 off)."""
    return "ieee" if dtype == torch.float32 else "tf32"
