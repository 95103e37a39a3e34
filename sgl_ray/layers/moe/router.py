"""Top-k expert selection, configured per model family (the router's linear layer lives in the MoE block).

::

    logits [T, E] ─ score ─▶ scores [T, E]          softmax (Mixtral, Qwen, OLMoE, DeepSeek-V2) or sigmoid (V3)
                   (+ correction bias, for the choice only)
                   (grouped: keep the best ``topk_group`` of ``num_expert_group`` groups, the rest masked)
                   ─ top-k ─▶ ids [T, k], weights = scores[ids]
                   (renormalize: weights / sum(weights))  (× routed_scaling_factor)

GPT-OSS picks the top-k of the raw logits and takes the softmax over those k (``softmax_after_topk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sgl_ray.layers.moe.base import TopK


@dataclass(frozen=True)
class RouterConfig:
    """Example (Qwen3-30B-A3B)::

    >>> RouterConfig(num_experts=128, top_k=8, renormalize=True).scoring
    'softmax'
    """

    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    softmax_after_topk: bool = False
    num_expert_group: int | None = None  # grouped top-k (DeepSeek): experts in this many equal groups
    topk_group: int | None = None  # ... of which the best this many are eligible
    group_score: Literal["max", "top2_sum"] = (
        "max"  # a group's score: its best expert, or its best two summed
    )
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # a learned per-expert bias added to the scores for the choice only

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be in [1, num_experts={self.num_experts}]")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("num_expert_group and topk_group go together")
        if self.num_expert_group is not None:
            if self.num_experts % self.num_expert_group:
                raise ValueError("num_expert_group must divide num_experts")
            if not 0 < self.topk_group <= self.num_expert_group:  # type: ignore[operator]
                raise ValueError("topk_group must be in [1, num_expert_group]")


def select_experts(
    logits: torch.Tensor, config: RouterConfig, correction_bias: torch.Tensor | None = None
) -> TopK:
    """``logits`` [T, E] (any float dtype) -> :class:`TopK` (float32 weights, int32 ids)."""
    logits = logits.float()
    if config.softmax_after_topk:
        values, ids = torch.topk(logits, config.top_k, dim=-1)
        return TopK(torch.softmax(values, dim=-1), ids.to(torch.int32))
    scores = torch.softmax(logits, dim=-1) if config.scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if config.num_expert_group is not None:
        t, groups = choice.shape[0], config.num_expert_group
        grouped = choice.view(t, groups, -1)  # [T, G, E / G]
        if config.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        best = torch.topk(group_scores, config.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(t, -1)
    ids = torch.topk(choice, config.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if config.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return TopK(weights, ids.to(torch.int32))
