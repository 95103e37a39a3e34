"""The router's top-k in one Triton kernel (CUDA; Triton's CPU interpreter in tests): scores, choice, weights and
the expert-load counts of a token row in one program, instead of ~7 small torch kernels per MoE layer — at batch 1
each costs a few microseconds of a step that streams ~40 MB of expert weights per layer.

One program per token: load its ``E`` logits, score them (softmax or sigmoid; GPT-OSS chooses on the raw logits),
add the correction bias for the choice, and choose the ``k`` best, best first (ties to the lowest id;
``torch.topk`` leaves their order unspecified): up to 256 experts by ranking every expert at once (one
[E, E] comparison summed, so a handful of block-wide reductions, each a barrier across the program's warps,
instead of ~3 per chosen expert), above that one expert per round. Then renormalize / softmax the ``k`` weights and scale them. Rows whose ``count_rows``
entry is nonzero add one per chosen expert to ``counts``. Grouped top-k (DeepSeek) stays on the torch path
(:func:`supports`).

On one-row steps :func:`gate_topk_router` also computes the logits (the router's GEMV, with the RMSNorm before it
as a scale of the product, as ``triton_gemv.normed_gemv`` does): each program writes its experts' logits and
counts itself done on a counter; the last one routes the row, so the choice needs no launch of its own. The
router's weights are read before the wait for the kernel before (programmatic dependent launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_ray.layers.moe.base import TopK
from sgl_ray.layers.moe.router import RouterConfig
from sgl_ray.layers.triton_gemv_epilogues import NormOfInput, rstd_of_parts
from sgl_ray.layers.triton_pdl import launch_args, pdl_enter, use_pdl


def supports(config: RouterConfig) -> bool:
    return config.num_expert_group is None and config.num_experts <= 1024


@triton.jit
def _route_row(
    logits, Bias, Weights, Ids, Counts, CountRows, t, num_experts, scale, TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr, AFTER_TOPK: tl.constexpr,
    RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr,
):  # fmt: skip
    """Token ``t``'s choice from its logits [BLOCK_E] (fp32, ``-inf`` past ``num_experts``): the module docstring's
    steps, written to row ``t`` of ``Weights``/``Ids`` and counted."""
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    if AFTER_TOPK:
        scores = logits
    elif SIGMOID:
        scores = tl.where(valid, tl.sigmoid(logits), 0.0)
    else:
        e = tl.exp(logits - tl.max(logits, 0))
        scores = e / tl.sum(e, 0)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(Bias + offs, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if BLOCK_E <= 256:
        # Each expert's rank in one reduction: the experts that beat it (higher choice, or equal with a lower
        # id). The chosen ones (rank < k) write themselves to slot ``rank``: about four block-wide reductions in
        # all, where k rounds of max/argmin/sum cost ~3k (each a barrier across the program's warps).
        other = tl.arange(0, BLOCK_E)
        c_i = choice[:, None]
        c_j = choice[None, :]
        beats = (c_j > c_i) | ((c_j == c_i) & (other[None, :] < offs[:, None]))
        rank = tl.sum(beats.to(tl.int32), axis=1)
        chosen = valid & (rank < TOP_K)
        if AFTER_TOPK:  # softmax over the chosen logits
            e = tl.where(chosen, tl.exp(scores - tl.max(tl.where(chosen, scores, float("-inf")), 0)), 0.0)
            ws = e / tl.sum(e, 0)
        elif RENORMALIZE:
            ws = scores / (tl.sum(tl.where(chosen, scores, 0.0), 0) + 1e-20)
        else:
            ws = scores
        ws = ws * scale
        tl.store(Weights + t * TOP_K + rank, ws, mask=chosen)
        tl.store(Ids + t * TOP_K + rank, offs, mask=chosen)
        if COUNT:
            if tl.load(CountRows + t) != 0:
                tl.atomic_add(Counts + offs, tl.full([BLOCK_E], 1, tl.int64), mask=chosen)
    else:
        slots = tl.arange(0, BLOCK_K)
        ws = tl.zeros([BLOCK_K], dtype=tl.float32)
        ids = tl.zeros([BLOCK_K], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(choice, 0)
            idx = tl.min(tl.where(choice == best, offs, BLOCK_E), 0)  # the lowest id among equal scores
            pick = offs == idx
            ws = tl.where(slots == j, tl.sum(tl.where(pick, scores, 0.0), 0), ws)
            ids = tl.where(slots == j, idx, ids)
            choice = tl.where(pick, float("-inf"), choice)
        in_k = slots < TOP_K
        if AFTER_TOPK:  # softmax over the chosen logits
            e = tl.where(in_k, tl.exp(ws - tl.max(tl.where(in_k, ws, float("-inf")), 0)), 0.0)
            ws = e / tl.sum(e, 0)
        elif RENORMALIZE:
            ws = ws / (tl.sum(tl.where(in_k, ws, 0.0), 0) + 1e-20)
        ws = ws * scale
        tl.store(Weights + t * TOP_K + slots, ws, mask=in_k)
        tl.store(Ids + t * TOP_K + slots, ids, mask=in_k)
        if COUNT:
            if tl.load(CountRows + t) != 0:
                tl.atomic_add(Counts + ids, tl.full([BLOCK_K], 1, tl.int64), mask=in_k)


@triton.jit
def _topk_router(
    Logits, Bias, Weights, Ids, Counts, CountRows, num_experts, stride_l, scale,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr,
    AFTER_TOPK: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    logits = tl.load(Logits + t * stride_l + offs, mask=offs < num_experts, other=float("-inf")).to(
        tl.float32
    )
    _route_row(
        logits, Bias, Weights, Ids, Counts, CountRows, t, num_experts, scale, TOP_K, BLOCK_E, BLOCK_K, SIGMOID,
        AFTER_TOPK, RENORMALIZE, HAS_BIAS, COUNT,
    )  # fmt: skip


def topk_router(
    logits: torch.Tensor,
    config: RouterConfig,
    correction_bias: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    count_rows: torch.Tensor | None = None,
) -> TopK:
    """``logits`` [T, E] -> :class:`TopK` like :func:`~sgl_ray.layers.moe.router.select_experts`; with ``counts``
    (int64 [E]), rows whose ``count_rows`` entry ([T], bool or int) is nonzero are counted (every row when None).
    No host synchronisation."""
    assert supports(config), "grouped top-k runs on the torch path"
    t, e = logits.shape
    k = config.top_k
    weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, k, dtype=torch.int32, device=logits.device)
    if t == 0:
        return TopK(weights, ids)
    count = counts is not None
    if count and count_rows is None:
        count_rows = torch.ones(t, dtype=torch.bool, device=logits.device)
    # fmt: off
    _topk_router[(t,)](
        logits, correction_bias if correction_bias is not None else logits, weights, ids,
        counts if count else ids, count_rows if count else ids,
        e, logits.stride(0), config.routed_scaling_factor,
        TOP_K=k, BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(k),
        SIGMOID=config.scoring == "sigmoid", AFTER_TOPK=config.softmax_after_topk,
        RENORMALIZE=config.renormalize, HAS_BIAS=correction_bias is not None, COUNT=count,
        num_warps=1 if e <= 256 else 4,
    )
    # fmt: on
    return TopK(weights, ids)


@triton.jit
def _gate_topk_kernel(
    X, W, GateBias, SqIn, num_parts, eps, NormW, hidden, stride_wn, Logits, Counter,
    Bias, Weights, Ids, Counts, CountRows, num_experts, scale,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr, SCALE_BY_SQ: tl.constexpr,
    SQ_BLOCK: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, USE_PDL: tl.constexpr, HAS_NORM_W: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr,
    AFTER_TOPK: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < num_experts
    offs_h = tl.arange(0, BLOCK_H)
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    # The weights do not depend on the kernel before: the first tile (with BLOCK_H >= H, the whole rows) is in
    # flight before the wait for the input row.
    if EVEN_H:
        w_first = tl.load(w_rows + offs_h[None, :], mask=n_ok[:, None], other=0.0)
    else:
        w_first = tl.load(
            w_rows + offs_h[None, :], mask=n_ok[:, None] & (offs_h < hidden)[None, :], other=0.0
        )
    pdl_enter(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + offs_h
        if h0 == 0:
            w = w_first
        elif EVEN_H:
            w = tl.load(w_rows + cols[None, :], mask=n_ok[:, None], other=0.0)
        else:
            w = tl.load(w_rows + cols[None, :], mask=n_ok[:, None] & (cols < hidden)[None, :], other=0.0)
        if EVEN_H:
            x = tl.load(X + cols).to(tl.float32)
            if HAS_NORM_W:
                x = x * tl.load(NormW + cols).to(tl.float32)
        else:
            x = tl.load(X + cols, mask=cols < hidden, other=0.0).to(tl.float32)
            if HAS_NORM_W:
                x = x * tl.load(NormW + cols, mask=cols < hidden, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if SCALE_BY_SQ:
        y = y * rstd_of_parts(SqIn, num_parts, hidden, eps, SQ_BLOCK)
    if HAS_GATE_BIAS:
        y += tl.load(GateBias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = y.to(X.dtype.element_ty).to(tl.float32)  # rounded as the GEMV's output is
    tl.store(Logits + offs_n, y, mask=n_ok)
    tl.debug_barrier()  # every thread's stores before the release below
    done = tl.atomic_add(Counter, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:  # the last program: every logit is written
        tl.store(Counter, 0)
        offs = tl.arange(0, BLOCK_E)
        logits = tl.load(Logits + offs, mask=offs < num_experts, other=float("-inf"), cache_modifier=".cg")
        _route_row(
            logits, Bias, Weights, Ids, Counts, CountRows, 0, num_experts, scale, TOP_K, BLOCK_E, BLOCK_K,
            SIGMOID, AFTER_TOPK, RENORMALIZE, HAS_BIAS, COUNT,
        )  # fmt: skip


def gate_topk_router(
    x: torch.Tensor,  # [1, H]
    weight: torch.Tensor,  # [E, H], the router's (with the norm's scale folded in when ``norm``)
    gate_bias: torch.Tensor | None,
    config: RouterConfig,
    counter: torch.Tensor,  # int32 [1], zero (left zero)
    norm: NormOfInput | None = None,
    correction_bias: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    count_rows: torch.Tensor | None = None,
) -> TopK:
    """:func:`topk_router` of ``x W^T + b`` (of ``rmsnorm(x)`` with ``norm``, its scale ``norm.weight`` applied to
    the input, or folded into ``weight`` when None; see ``triton_gemv.normed_gemv``) in one launch, for one row;
    the logits are rounded to ``x``'s dtype as the GEMV's output is."""
    assert supports(config), "grouped top-k runs on the torch path"
    e, hidden = weight.shape
    if x.dim() != 2 or x.shape != (1, hidden) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(
            f"one row of {hidden} (unit stride) for a [{e}, {hidden}] router, got {tuple(x.shape)}"
        )
    if counter.dtype != torch.int32 or counter.numel() < 1:
        raise ValueError("counter must be an int32 tensor of zeros")
    k = config.top_k
    weights = torch.empty(1, k, dtype=torch.float32, device=x.device)
    ids = torch.empty(1, k, dtype=torch.int32, device=x.device)
    logits = torch.empty(e, dtype=torch.float32, device=x.device)
    count = counts is not None
    if count and count_rows is None:
        count_rows = torch.ones(1, dtype=torch.bool, device=x.device)
    sq_in = norm.sumsq if norm is not None else x
    num_parts = sq_in.shape[1] if norm is not None else 1
    norm_w = norm.weight if norm is not None else None
    block_n = min(8, triton.next_power_of_2(e))
    block_h = min(2048, triton.next_power_of_2(hidden))
    pdl = use_pdl(x)
    _gate_topk_kernel[(triton.cdiv(e, block_n),)](
        x, weight, gate_bias if gate_bias is not None else weight, sq_in, num_parts,
        norm.eps if norm is not None else 0.0, norm_w if norm_w is not None else x, hidden, weight.stride(0),
        logits, counter,
        correction_bias if correction_bias is not None else logits, weights, ids,
        counts if count else ids, count_rows if count else ids, e, config.routed_scaling_factor,
        BLOCK_N=block_n, BLOCK_H=block_h, EVEN_H=hidden % block_h == 0, SCALE_BY_SQ=norm is not None,
        SQ_BLOCK=min(1024, triton.next_power_of_2(num_parts)), HAS_GATE_BIAS=gate_bias is not None,
        USE_PDL=pdl, HAS_NORM_W=norm_w is not None, TOP_K=k, BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(k),
        SIGMOID=config.scoring == "sigmoid", AFTER_TOPK=config.softmax_after_topk,
        RENORMALIZE=config.renormalize, HAS_BIAS=correction_bias is not None, COUNT=count,
        num_warps=4, **launch_args(pdl),
    )  # fmt: skip
    return TopK(weights, ids)
