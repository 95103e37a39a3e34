"""``runner.ahead.resolve_ahead``: a step planned while a verify step ran starts where that step's rejected drafts
did, in their KV slots, then in its own."""

from __future__ import annotations

import numpy as np
import pytest

from sgl_ray.runner.ahead import resolve_ahead
from sgl_ray.scheduler.plan import StepPlan

_I64 = np.int64


def _a(*values: int) -> np.ndarray:
    return np.array(values, dtype=_I64)


def _plan(**fields) -> StepPlan:
    n = len(fields["req_pool_idxs"])
    return StepPlan(step_id=1, sample=np.ones(n, dtype=np.bool_), **fields)


# The verify step: slot 3 ran [x d1 d2 d3] at 10..13 in slots 50..53; slot 7 ran [x d1] at 20..21 in 60..61;
# slot 9 decoded without drafts.
PREVIOUS = _plan(
    req_pool_idxs=_a(3, 7, 9),
    prefix_lens=_a(10, 20, 30),
    extend_lens=_a(4, 2, 1),
    input_ids=_a(0, 0, 0, 0, 0, 0, 0),
    out_cache_loc=_a(50, 51, 52, 53, 60, 61, 70),
    draft_lens=_a(3, 1, 0),
)


def test_entries_start_over_the_rejected_drafts():
    # planned ahead: slot 3 [y e1 e2] at 14.. in 80..82, slot 7 [y e1 e2 e3] at 22.. in 90..93, slot 9 at 31
    plan = _plan(
        req_pool_idxs=_a(3, 7, 9),
        prefix_lens=_a(14, 22, 31),
        extend_lens=_a(3, 4, 1),
        input_ids=np.full(8, -1, dtype=_I64),
        out_cache_loc=_a(80, 81, 82, 90, 91, 92, 93, 95),
        ahead_drafts=_a(3, 1, 0),
        ahead_slots=_a(51, 52, 53, 61),
    )
    # slot 3 kept d1 (2 emitted: 2 rejected), slot 7 kept nothing (1 emitted: 1 rejected)
    out = resolve_ahead(plan, PREVIOUS, emitted=_a(2, 1, 1), max_reqs=16)
    assert out.prefix_lens.tolist() == [12, 21, 31]
    assert out.out_cache_loc.tolist() == [52, 53, 80, 61, 90, 91, 92, 95]
    assert len(out.ahead_drafts) == 0 and len(out.ahead_slots) == 0
    # every draft kept: nothing moves
    same = resolve_ahead(plan, PREVIOUS, emitted=_a(4, 2, 1), max_reqs=16)
    assert same.prefix_lens.tolist() == [14, 22, 31]
    assert same.out_cache_loc.tolist() == plan.out_cache_loc.tolist()


def test_a_short_chunk_lies_wholly_over_rejected_drafts():
    plan = _plan(
        req_pool_idxs=_a(3),
        prefix_lens=_a(14),
        extend_lens=_a(1),
        input_ids=_a(-1),
        out_cache_loc=_a(80),
        ahead_drafts=_a(3),
        ahead_slots=_a(51, 52, 53),
    )
    out = resolve_ahead(plan, PREVIOUS, emitted=_a(1, 2, 1), max_reqs=16)  # all 3 rejected
    assert out.prefix_lens.tolist() == [11] and out.out_cache_loc.tolist() == [51]


def test_ahead_of_a_step_that_did_not_verify_the_slot():
    plan = _plan(
        req_pool_idxs=_a(9),
        prefix_lens=_a(31),
        extend_lens=_a(1),
        input_ids=_a(-1),
        out_cache_loc=_a(95),
        ahead_drafts=_a(2),
        ahead_slots=_a(70, 71),
    )
    with pytest.raises(AssertionError, match="other drafts"):
        resolve_ahead(plan, PREVIOUS, emitted=_a(2, 1, 1), max_reqs=16)
