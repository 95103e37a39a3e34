"""Small-batch path of the Triton MoE backend (decode): matrix-vector products, no sorting, two launches.

With a handful of pairs, padding each expert's rows to a 16-row tile wastes nothing in bandwidth but costs the
sorting launches; what bounds a decode step is reading the active experts' weights once. So::

    gemv1, one program per (pair p, BLOCK_N rows of I):   h[p, rows] = act(w13[e][rows] @ x[p // k] + b13)
           (gate and up rows side by side; pairs outside this rank's experts return at once, unwritten)
    gemv2, one program per (token t, BLOCK_N rows of H):  out[t, rows] = sum_j w_tj (w2[e_tj][rows] @ h[t*k+j] + b2)
           (the combine inside the program: the k pairs of a token in one loop, fp32 throughout, one store)

On the one-row steps of a model whose norm scales are folded into the projections (``LlamaDecoderLayer.
forward_folded``) the two launches also carry the norm around them: gemv1 reads the residual stream ``h`` and
scales its products by RMSNorm's ``1 / sqrt(mean(h^2) + eps)`` from the sums of squares the previous GEMV wrote by
parts, and gemv2 adds ``h`` to its output and writes that sum's squares by parts for the next layer's norm.

Programs are numbered pair-fastest (token-fastest), so the programs of two pairs that share an expert read the
same weight rows at about the same time and the second read is an L2 hit: DRAM sees each active expert once.
The loops keep a [BLOCK_N, BLOCK_K] fp32 partial product per lane and reduce it once at the end. ``counts``
is folded into gemv1 (the first row block's programs add one per pair, local or not).

Triton does not software-pipeline these loops, so the bytes in flight come from the tiles themselves: gemv2 loads
``PAIRS`` pairs' tiles as one [PAIRS, BLOCK_N, BLOCK_K] load. With programmatic dependent launch (Hopper, see
:mod:`sgl_ray.layers.triton_pdl`) gemv2 starts while gemv1 finishes: before waiting it reads the routing (written
before gemv1 started, so final) and its first weight tile, which with ``BLOCK_K >= I`` is the whole rows of its
first ``PAIRS`` pairs. Measured on an H100 (Qwen3-30B-A3B shape, bf16, T = 1, CUDA graph): 30.6 us for both
launches, 83% of the copy rate for the 75.5 MB of weights read; with 256-column tiles 33.9 us.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from sgl_ray.layers.moe.base import ExpertWeights
from sgl_ray.layers.moe.triton_configs import GemvConfig
from sgl_ray.layers.moe.triton_kernels import act_fn, activation_code
from sgl_ray.layers.triton_gemv_epilogues import NormOfInput, rstd_of_parts
from sgl_ray.layers.triton_pdl import launch_args, pdl_enter, use_pdl


@triton.jit(do_not_specialize=["num_pairs"])
def _gemv_gate_up_kernel(
    X, W13, B13, Hout, Ids, Counts, CountMask, num_pairs, first_expert, num_local, top_k, inter, hidden,
    stride_xt, stride_we, stride_wn, stride_be, stride_ht, alpha, limit, SqIn, num_parts, eps, NormW,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_MASK: tl.constexpr, USE_PDL: tl.constexpr,
    SCALE_BY_SQ: tl.constexpr, SQ_BLOCK: tl.constexpr, HAS_NORM_W: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    p = pid % num_pairs
    nb = pid // num_pairs
    pdl_enter(USE_PDL)
    gid = tl.load(Ids + p)
    if HAS_COUNTS:  # the load statistic, once per pair (local or not)
        counted = (nb == 0) & (gid >= 0)
        if HAS_MASK:
            counted = counted & (tl.load(CountMask + p // top_k) != 0)
        tl.atomic_add(Counts + gid, 1, mask=counted)
    e = gid - first_expert
    if (e < 0) | (e >= num_local):
        return
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    g_rows = W13 + e.to(tl.int64) * stride_we + (offs_n % inter)[:, None] * stride_wn  # [BLOCK_N, 1]
    u_rows = g_rows + inter * stride_wn
    x_row = X + (p // top_k).to(tl.int64) * stride_xt
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        cols = k0 + offs_k
        if EVEN_K:
            xv = tl.load(x_row + cols).to(tl.float32)
            wg = tl.load(g_rows + cols[None, :])
            wu = tl.load(u_rows + cols[None, :])
            if HAS_NORM_W:
                xv = xv * tl.load(NormW + cols).to(tl.float32)
        else:
            in_k = cols < hidden
            xv = tl.load(x_row + cols, mask=in_k, other=0.0).to(tl.float32)
            wg = tl.load(g_rows + cols[None, :], mask=in_k[None, :], other=0.0)
            wu = tl.load(u_rows + cols[None, :], mask=in_k[None, :], other=0.0)
            if HAS_NORM_W:
                xv = xv * tl.load(NormW + cols, mask=in_k, other=0.0).to(tl.float32)
        acc_g += wg.to(tl.float32) * xv[None, :]
        acc_u += wu.to(tl.float32) * xv[None, :]
    gate = tl.sum(acc_g, axis=1)  # [BLOCK_N]
    up = tl.sum(acc_u, axis=1)
    if SCALE_BY_SQ:  # RMSNorm's scale of the token's row, from the sums of squares of its parts
        rstd = rstd_of_parts(SqIn + (p // top_k).to(tl.int64) * num_parts, num_parts, hidden, eps, SQ_BLOCK)
        gate = gate * rstd
        up = up * rstd
    if HAS_BIAS:
        b_row = B13 + e.to(tl.int64) * stride_be
        gate += tl.load(b_row + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        up += tl.load(b_row + inter + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    dtype = Hout.dtype.element_ty
    h = act_fn(gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32), ACT, alpha, limit)
    tl.store(Hout + p.to(tl.int64) * stride_ht + offs_n, h.to(dtype), mask=n_ok)


@triton.jit
def _pair_group(Ids, RouteW, first_pair, j0, first_expert, num_local, inter, TOP_K: tl.constexpr,
                PAIRS: tl.constexpr):  # fmt: skip
    """Pairs ``j0 .. j0 + PAIRS - 1`` of a token: their ids, local experts (int64, 0 if not local), routing
    weights (0 if not local) and whether this rank computes them (else nothing of theirs is loaded)."""
    j = j0 + tl.arange(0, PAIRS)
    pair = first_pair + tl.minimum(j, TOP_K - 1)  # [PAIRS]
    e = tl.load(Ids + pair) - first_expert
    local = (j < TOP_K) & (e >= 0) & (e < num_local)
    route = tl.where(local, tl.load(RouteW + pair), 0.0)
    return pair, tl.where(local, e, 0).to(tl.int64), route, local


@triton.jit
def _down_tile(W2, e, rows, cols, local, inter, stride_we, stride_wn):
    """w2[e][rows, cols] of every pair of a group: [PAIRS, BLOCK_N, BLOCK_K], one load in flight. (The mask is
    constant along K in runs of 16, so that the loads stay 16 bytes wide.)"""
    ptrs = W2 + e[:, None, None] * stride_we + rows[None, :, None] * stride_wn + cols[None, None, :]
    return tl.load(ptrs, mask=local[:, None, None] & (cols < inter)[None, None, :], other=0.0)


@triton.jit
def _down_step(acc, w, Hin, pair, route, cols, local, inter, stride_ht):
    """acc [BLOCK_N, BLOCK_K] += sum over the group of w * (route * h[pair, cols])."""
    h_ptrs = Hin + pair.to(tl.int64)[:, None] * stride_ht + cols[None, :]
    h_mask = local[:, None] & (cols < inter)[None, :]
    hv = tl.load(h_ptrs, mask=h_mask, other=0.0).to(tl.float32) * route[:, None]
    return acc + tl.sum(w.to(tl.float32) * hv[:, None, :], axis=0)


@triton.jit(do_not_specialize=["num_tokens"])
def _gemv_down_combine_kernel(
    Hin, W2, B2, Out, Ids, RouteW, num_tokens, first_expert, num_local, hidden, inter,
    stride_ht, stride_we, stride_wn, stride_be, stride_ot, Res, stride_res, SqOut,
    TOP_K: tl.constexpr, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = pid % num_tokens
    nb = pid // num_tokens
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % hidden  # rows past H wrap onto valid ones (never stored): loads need no row mask
    offs_k = tl.arange(0, BLOCK_K)
    first_pair = t * TOP_K
    # The routing is final before gemv1 starts and the weights never change (see the module docstring): the
    # first tile is read before waiting for gemv1, whose output h is read after.
    pair, e, route, local = _pair_group(
        Ids, RouteW, first_pair, 0, first_expert, num_local, inter, TOP_K, PAIRS
    )
    w = _down_tile(W2, e, rows, offs_k, local, inter, stride_we, stride_wn)
    pdl_enter(USE_PDL)
    acc = _down_step(
        tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), w, Hin, pair, route, offs_k, local, inter, stride_ht
    )
    for k0 in range(BLOCK_K, inter, BLOCK_K):  # the rest of the first group
        w = _down_tile(W2, e, rows, k0 + offs_k, local, inter, stride_we, stride_wn)
        acc = _down_step(acc, w, Hin, pair, route, k0 + offs_k, local, inter, stride_ht)
    for j0 in range(PAIRS, TOP_K, PAIRS):
        pair, e, route, local = _pair_group(
            Ids, RouteW, first_pair, j0, first_expert, num_local, inter, TOP_K, PAIRS
        )  # fmt: skip
        for k0 in range(0, inter, BLOCK_K):
            w = _down_tile(W2, e, rows, k0 + offs_k, local, inter, stride_we, stride_wn)
            acc = _down_step(acc, w, Hin, pair, route, k0 + offs_k, local, inter, stride_ht)
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:  # sum_j route_j * b2[e_j]
        for j0 in range(0, TOP_K, PAIRS):
            pair, e, route, local = _pair_group(
                Ids, RouteW, first_pair, j0, first_expert, num_local, hidden, TOP_K, PAIRS
            )  # fmt: skip
            b_ptrs = B2 + e[:, None] * stride_be + offs_n[None, :]
            b = tl.load(
                b_ptrs, mask=local[:, None] & (offs_n < hidden)[None, :], other=0.0
            )  # [PAIRS, BLOCK_N]
            y += tl.sum(b.to(tl.float32) * route[:, None], axis=0)
    n_ok = offs_n < hidden
    out = y.to(Out.dtype.element_ty)
    if (
        ADD_RESIDUAL
    ):  # h = residual + y, rounded as the RMSNorm kernel's add rounds it; and this part's sum of h^2
        r = tl.load(Res + t.to(tl.int64) * stride_res + offs_n, mask=n_ok, other=0.0)
        out = (out.to(tl.float32) + r.to(tl.float32)).to(Out.dtype.element_ty)
        hf = tl.where(n_ok, out.to(tl.float32), 0.0)
        tl.store(SqOut + t.to(tl.int64) * (tl.num_programs(0) // num_tokens) + nb, tl.sum(hf * hf, axis=0))
    tl.store(Out + t.to(tl.int64) * stride_ot + offs_n, out, mask=n_ok)


def small_batch_experts(
    x: torch.Tensor, weights: ExpertWeights, route_weights: torch.Tensor, ids: torch.Tensor,
    first_expert: int, gemv1: GemvConfig, gemv2: GemvConfig, counts: torch.Tensor | None,
    count_mask: torch.Tensor | None, empty: Callable[..., torch.Tensor], norm: NormOfInput | None = None,
    add_residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The whole MoE of a small batch in two launches (see the module docstring); ``out`` [T, H] in x.dtype.

    ``norm``: ``x`` is the residual stream ``h`` whose RMSNorm the experts take, ``norm.sumsq`` its sums of squares
    by parts and ``norm.weight`` the norm's scale ``g`` (None: folded into ``w13`` as ``W diag(g)``): gemv1 reads
    ``g * h`` and scales its products by ``1 / sqrt(mean(h^2) + eps)`` (as ``triton_gemv.normed_gemv`` does). ``add_residual``: returns
    ``(x + out, sumsq)`` instead, ``sumsq`` [T, parts] fp32 the sums of squares of that sum by parts, for the next
    layer's norm (as ``triton_gemv.residual_gemv`` does)."""
    w13, w2, b13, b2, act = weights
    num_local, hidden, inter = w2.shape
    tokens, top_k = ids.shape
    num_pairs = tokens * top_k
    pdl = use_pdl(x)
    h = empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    block_k1 = min(gemv1.block_k, triton.next_power_of_2(hidden))
    sq_in = norm.sumsq if norm is not None else x
    if norm is not None and (sq_in.dim() != 2 or sq_in.shape[0] != tokens or not sq_in.is_contiguous()):
        raise ValueError(
            f"norm.sumsq must be a contiguous [{tokens}, parts] tensor, got {tuple(sq_in.shape)}"
        )
    num_parts = sq_in.shape[1] if norm is not None else 1
    norm_w = norm.weight if norm is not None else None
    if norm_w is not None and norm_w.shape != (hidden,):
        raise ValueError(f"norm.weight must be [{hidden}], got {tuple(norm_w.shape)}")
    _gemv_gate_up_kernel[(triton.cdiv(inter, gemv1.block_n) * num_pairs,)](
        x, w13, b13 if b13 is not None else w13, h, ids, counts if counts is not None else ids,
        count_mask if count_mask is not None else ids, num_pairs, first_expert, num_local, top_k, inter, hidden,
        x.stride(0), w13.stride(0), w13.stride(1), b13.stride(0) if b13 is not None else 0, h.stride(0),
        act.alpha, act.limit, sq_in, num_parts, norm.eps if norm is not None else 0.0, norm_w if norm_w is not None else x,
        BLOCK_N=gemv1.block_n, BLOCK_K=block_k1, EVEN_K=hidden % block_k1 == 0,
        HAS_BIAS=b13 is not None, ACT=activation_code(act), HAS_COUNTS=counts is not None,
        HAS_MASK=count_mask is not None, USE_PDL=pdl, SCALE_BY_SQ=norm is not None, HAS_NORM_W=norm_w is not None,
        SQ_BLOCK=min(1024, triton.next_power_of_2(num_parts)), num_warps=gemv1.num_warps,
        num_stages=gemv1.num_stages, **launch_args(pdl),
    )  # fmt: skip
    out = empty((tokens, hidden), dtype=x.dtype, device=x.device)
    row_blocks = triton.cdiv(hidden, gemv2.block_n)
    sq_out = empty((tokens, row_blocks), dtype=torch.float32, device=x.device) if add_residual else None
    block_k2 = min(gemv2.block_k, triton.next_power_of_2(inter))
    _gemv_down_combine_kernel[(row_blocks * tokens,)](
        h, w2, b2 if b2 is not None else w2, out, ids, route_weights, tokens, first_expert, num_local, hidden,
        inter, h.stride(0), w2.stride(0), w2.stride(1), b2.stride(0) if b2 is not None else 0, out.stride(0),
        x, x.stride(0), sq_out if sq_out is not None else out,
        TOP_K=top_k, PAIRS=min(gemv2.pairs, triton.next_power_of_2(top_k)), BLOCK_N=gemv2.block_n,
        BLOCK_K=block_k2, HAS_BIAS=b2 is not None, USE_PDL=pdl, ADD_RESIDUAL=add_residual,
        num_warps=gemv2.num_warps, num_stages=gemv2.num_stages, **launch_args(pdl),
    )  # fmt: skip
    return (out, sq_out) if add_residual else out
