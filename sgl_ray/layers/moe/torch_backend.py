"""Experts in plain torch (CPU, and the reference for the fused kernels): the routed (token, expert) pairs are
sorted by expert, and each expert with tokens runs as two matmuls over all of its tokens at once.

::

    pairs (t, j) of this rank, sorted by expert:  | expert a: its tokens | expert b: its tokens | ...
    expert e: rows = x[tokens_e]  ->  h = act(rows @ w13[e].T + b13[e])  ->  (h @ w2[e].T + b2[e]) * weight
    out.index_add_(0, tokens_e, ...)   (float32)

The loop runs over the experts that received tokens (its length is read on the host), never over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sgl_ray.layers.moe.base import ExpertWeights, MoEBackend, TopK, count_experts


class TorchMoEBackend(MoEBackend):
    supports_cuda_graph = False  # reads the per-expert token counts on the host

    def run_experts(
        self,
        x: torch.Tensor,
        weights: ExpertWeights,
        topk: TopK,
        first_expert: int = 0,
        counts: torch.Tensor | None = None,
        count_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if counts is not None:
            count_experts(counts, topk.ids, count_mask)
        num_local, k = weights.w13.shape[0], topk.ids.shape[1]
        inter = weights.w2.shape[2]
        local = topk.ids.reshape(-1).long() - first_expert  # [T * k]
        pairs = torch.nonzero((local >= 0) & (local < num_local)).squeeze(1)  # pair index t * k + j
        experts = local[pairs]
        order = torch.argsort(experts, stable=True)
        pairs, experts = pairs[order], experts[order]
        per_expert = torch.bincount(experts, minlength=num_local).tolist()
        tokens = pairs // k
        route_weights = topk.weights.reshape(-1)[pairs]  # [P] float32
        out = torch.zeros(x.shape[0], weights.w2.shape[1], dtype=torch.float32, device=x.device)
        act = weights.activation
        start = 0
        for e, n in enumerate(per_expert):
            if n == 0:
                continue
            rows = slice(start, start + n)
            start += n
            b13 = weights.b13[e] if weights.b13 is not None else None
            b2 = weights.b2[e] if weights.b2 is not None else None
            h = F.linear(x[tokens[rows]], weights.w13[e], b13)  # [n, 2I]
            h = act(h[:, :inter], h[:, inter:])  # [n, I]
            y = F.linear(h, weights.w2[e], b2)  # [n, H]
            out.index_add_(0, tokens[rows], y.float() * route_weights[rows, None])
        return out.to(x.dtype)
