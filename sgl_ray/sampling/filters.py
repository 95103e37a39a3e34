"""top-k / top-p / min-p as one keep-cutoff per row, in logit space.

Semantics (as SGLang): the three filters read the same temperature-scaled distribution ``p = softmax(z)``
sorted descending. top-k keeps the first ``k``; top-p keeps the shortest prefix whose mass reaches ``top_p``
(the top token always); min-p keeps ``p_v >= min_p * max(p)``, i.e. ``z_v >= max(z) + log(min_p)``. The row's
cutoff ``c`` is the largest of the three thresholds, and the kept set is ``{v : z_v >= c}`` — every token tied
with the cutoff is kept, so the set depends on the logits alone, never on how a sort broke ties.

Finding ``c`` needs the sorted prefix up to the last kept token. top-k alone needs only ``topk(max k)``. For
top-p, with ``truncate`` (meant for CPU, where reading a flag back is free and a full sort is slow) it tries
``topk(k)`` for a growing ``k`` until every row's prefix holds its top-p set; otherwise it sorts the whole row
once and never reads device memory. All ways give the same cutoffs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sgl_ray.sampling.state import BatchPlan, SamplingState

_FIRST_K = 128
_GROWTH = 8


class Candidates(NamedTuple):
    """The kept set of each row: ``z >= cutoff``; with truncation also the top ``K`` tokens holding every set."""

    cutoff: torch.Tensor  # [B, 1] float; -inf where the row keeps everything
    values: torch.Tensor | None  # [B, K] z sorted descending (K >= every row's kept-set size), or None
    ids: torch.Tensor | None  # [B, K] int64 token ids of ``values``, or None


def select_candidates(
    z: torch.Tensor, state: SamplingState, slots: torch.Tensor, plan: BatchPlan, truncate: bool
) -> Candidates:
    """Cutoffs for the rows of ``z`` [B, V] (temperature-scaled logits); rows of greedy requests keep their max.

    With ``truncate`` and ``plan.all_restricted``, also the sorted top-``K`` candidates (``K`` = largest kept set).
    """
    b, v = z.shape
    greedy = state.greedy[slots]  # [B]
    vals = ids = None
    cutoff = torch.full((b, 1), float("-inf"), device=z.device)
    if plan.top_k or plan.top_p:
        lse = torch.logsumexp(z, dim=-1, keepdim=True) if plan.top_p else None  # [B, 1]
        # top-k alone always fits in the largest k; top-p needs a full sort unless truncating (a host read).
        if truncate:
            k = min(v, _pow2_at_least(max(_FIRST_K, plan.max_top_k)))
        else:
            k = v if plan.top_p else plan.max_top_k
        while True:
            if k == v:
                vals, ids = z.sort(dim=-1, descending=True)
            else:
                vals, ids = z.topk(k, dim=-1)
            cutoff, fits = _prefix_cutoff(vals, lse, state, slots, v)
            if k == v or not plan.top_p or bool((fits | greedy).all()):
                break
            k = min(v, k * _GROWTH)
    zmax = vals[:, :1] if vals is not None else z.amax(dim=-1, keepdim=True)  # [B, 1]
    if plan.min_p:
        cutoff = torch.maximum(cutoff, zmax + torch.log(state.min_p[slots]).unsqueeze(1))
    cutoff = torch.where(greedy.unsqueeze(1), zmax, cutoff)
    if not (truncate and plan.all_restricted):
        return Candidates(cutoff, None, None)
    # Kept-set sizes: counted in the sorted prefix unless a row's set may run past its end.
    if vals is not None and (vals.shape[1] == v or not bool((vals[:, -1:] >= cutoff).any())):
        width = int((vals >= cutoff).sum(dim=-1).max())
    else:
        width = int((z >= cutoff).sum(dim=-1).max())
    if vals is None or ids is None or width > vals.shape[1]:
        vals, ids = z.topk(width, dim=-1)
    return Candidates(cutoff, vals[:, :width], ids[:, :width])


def _prefix_cutoff(
    vals: torch.Tensor, lse: torch.Tensor | None, state: SamplingState, slots: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k / top-p cutoff from the sorted prefix ``vals`` [B, k] of every row, and whether the prefix sufficed.

    Returns (cutoff [B, 1], fits [B] bool). ``cutoff`` is -inf on rows using neither filter.
    """
    k = vals.shape[1]
    top_k = state.top_k[slots]  # [B]; vocab_size when off
    n_keep = top_k
    fits = (top_k <= k) | (k == vocab_size)
    restricted = top_k < vocab_size
    if lse is not None:
        top_p = state.top_p[slots]  # [B]
        probs = torch.exp(vals - lse)  # [B, k]
        mass = probs.cumsum(dim=-1)  # [B, k]
        mass_before = mass - probs  # exclusive prefix sums, nondecreasing
        n_p = (mass_before < top_p.unsqueeze(1)).sum(dim=-1)  # prefix length, >= 1 since top_p > 0
        uses_p = top_p < 1.0  # rounding must not cut rows with top_p == 1
        n_keep = torch.where(uses_p, torch.minimum(n_keep, n_p), n_keep)
        fits = fits | (uses_p & (mass[:, -1] >= top_p))
        restricted = restricted | uses_p
    n_keep = n_keep.clamp(min=1, max=k)
    cutoff = vals.gather(1, (n_keep - 1).unsqueeze(1))  # [B, 1]
    cutoff = torch.where(restricted.unsqueeze(1), cutoff, torch.full_like(cutoff, float("-inf")))
    return cutoff, fits | ~restricted


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
