"""Overlap scheduling with speculative decoding, on the runner: where a step planned ahead of a verify step starts.

The scheduler plans a speculating request's next step while its verify step still runs, as if that step kept
every draft (``StepPlan.ahead_drafts``): the chunk's ``prefix_lens`` and ``out_cache_loc`` assume the worst case.
Once the verify step's emitted counts are known, :func:`resolve_ahead` moves each such entry back by the drafts
that step rejected, into their KV slots (``StepPlan.ahead_slots``), then the plan's own slots::

    verify step:     x  d1 d2 d3          at P .. P+3, keeps d1 (2 emitted, d2 d3 rejected)
    planned ahead:               y  e1 e2  at P+4 .. P+6, new slots s4 s5 s6
    resolved:              y  e1 e2        at P+2 .. P+4, slots of d2 d3, then s4 (s5 s6 unused: freed later)
"""

from __future__ import annotations

import msgspec
import numpy as np

from sgl_ray.scheduler.plan import StepPlan

_NONE = np.zeros(0, dtype=np.int64)


def resolve_ahead(plan: StepPlan, previous: StepPlan, emitted: np.ndarray, max_reqs: int) -> StepPlan:
    """``plan`` with its entries planned ahead of ``previous`` (the verify step launched just before it, which
    emitted ``emitted[b]`` tokens for its entry ``b``) started where that step's rejected drafts did."""
    ahead = plan.ahead_drafts
    verified = previous.draft_lens > 0
    by_slot = np.full(max_reqs, -1, dtype=np.int64)  # drafts the previous step rejected, by request slot
    by_slot[previous.req_pool_idxs[verified]] = (previous.draft_lens + 1 - emitted)[verified]
    rows = np.flatnonzero(ahead > 0)
    rejected = np.zeros(plan.batch_size, dtype=np.int64)
    rejected[rows] = by_slot[plan.req_pool_idxs[rows]]
    assert (rejected >= 0).all() and (rejected <= ahead).all(), "planned ahead of a step with other drafts"
    out_cache_loc = plan.out_cache_loc.copy()
    starts = np.cumsum(plan.extend_lens) - plan.extend_lens
    ahead_end = np.cumsum(ahead)
    for i in np.flatnonzero(rejected):  # the rejected drafts' slots first, then the plan's own
        n, lo = int(plan.extend_lens[i]), int(starts[i])
        reused = plan.ahead_slots[ahead_end[i] - rejected[i] : ahead_end[i]]
        out_cache_loc[lo : lo + n] = np.concatenate([reused, plan.out_cache_loc[lo : lo + n]])[:n]
    return msgspec.structs.replace(
        plan,
        prefix_lens=plan.prefix_lens - rejected,
        out_cache_loc=out_cache_loc,
        ahead_drafts=_NONE,
        ahead_slots=_NONE,
    )
