"""The router's top-k in one Triton kernel (CUDA; Triton's CPU interpreter in tests): scores, choice, weights and
the expert-load counts of a token row in one program, instead of ~7 small torch kernels per MoE layer — at batch 1
each costs a few microseconds of a step that streams ~40 MB of expert weights per layer.

One program per token: load its ``E`` logits, score them (softmax or sigmoid; GPT-OSS chooses on the raw logits),
add the correction bias for the choice, take the best expert ``k`` times (ties to the lowest id, as
``torch.topk`` on a CPU), then renormalize / softmax the ``k`` weights and scale them. Rows whose ``count_rows``
entry is nonzero add one per chosen expert to ``counts``. Grouped top-k (DeepSeek) stays on the torch path
(:func:`supports`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_ray.layers.moe.base import TopK
from sgl_ray.layers.moe.router import RouterConfig


def supports(config: RouterConfig) -> bool:
    return config.num_expert_group is None and config.num_experts <= 1024


# fmt: off
@triton.jit
def _topk_router(
    Logits, Bias, Weights, Ids, Counts, CountRows,
    num_experts, stride_l, scale,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr, AFTER_TOPK: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, COUNT: tl.constexpr,
):
    # fmt: on
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    logits = tl.load(Logits + t * stride_l + offs, mask=valid, other=float("-inf")).to(tl.float32)  # [E]
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
