"""The real Scheduler over a real ModelRunner: preemption, aborts, n > 1 groups, finish reasons and input
logprobs, with KV-slot accounting after every scenario."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from sgl_ray.errors import InvalidRequestError
from sgl_ray.mem_cache.base import CacheKey
from sgl_ray.scheduler.plan import StepOutput, StepPlan
from sgl_ray.scheduler.request import RequestGroup

from .scheduler_harness import (
    Harness,
    make_req,
    prompt,
    rng,
    run_alone,
)

# --- preemption ---------------------------------------------------------------------------------------------


def test_preemption_resumes_requests_exactly_and_leaks_nothing(model) -> None:
    new = 10
    prompts = {rid: prompt(6, 1000 * (i + 1)) for i, rid in enumerate("abcd")}
    # Each request ends with 6 + 9 computed tokens: 32 slots hold two of them, not four. A zero new-token ratio
    # admits every prompt that fits now, so the decodes must preempt.
    h = Harness(model, num_slots=33, init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    h.add(*(make_req(rid, ids, new) for rid, ids in prompts.items()))
    h.run(max_steps=200)
    assert h.sched.num_preemptions > 0

    # A preempted request is bound again with the tokens it had generated so far.
    emitted: dict[str, list[int]] = defaultdict(list)
    resumed = []
    for plan, owners, outs in zip(h.plans, h.owners, h.step_outputs, strict=True):
        for n in plan.new_requests:
            rid = owners[n.req_pool_idx]
            assert n.output_ids == emitted[rid]
            if n.output_ids:
                resumed.append(rid)
        for o in outs:
            emitted[o.rid].extend(o.token_ids)
    assert resumed

    for rid, ids in prompts.items():
        assert h.finish(rid) == {"type": "length", "length": new}
        assert len(h.tokens(rid)) == new
        assert h.tokens(rid) == run_alone(model, ids, new), rid
    h.assert_no_leaks()


def test_preemption_picks_the_lowest_priority_victim(model) -> None:
    h = Harness(model, num_slots=25, init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    low = make_req("low", prompt(6, 1000), 10, priority=0)
    high = make_req("high", prompt(6, 2000), 10, priority=1)
    h.add(low, high)  # low is admitted first, so it is not the most recent admission
    h.run()
    assert low.num_retractions >= 1 and high.num_retractions == 0
    done = [i for i, outs in enumerate(h.step_outputs) for o in outs if o.finished]
    assert [o.rid for o in h.step_outputs[done[0]] if o.finished] == ["high"]
    assert len(h.tokens("low")) == len(h.tokens("high")) == 10
    h.assert_no_leaks()


def test_a_lone_request_that_outgrows_the_pool_is_aborted(model) -> None:
    h = Harness(model, num_slots=17)  # 16 slots: the prompt and 6 decoded tokens
    h.add(make_req("a", prompt(10), 20))
    h.run()
    assert len(h.tokens("a")) == 7
    assert h.finish("a") == {"type": "abort", "message": "the KV cache is too small for this request"}
    assert h.sched.num_preemptions == 0
    h.assert_no_leaks()


def test_admission_that_cannot_fit_leaves_the_cache_and_slots_alone(model) -> None:
    shared = prompt(8, 1000)
    h = Harness(model, num_slots=17, init_new_token_ratio=0.0, min_new_token_ratio=0.0)  # 16 slots
    h.add(make_req("w", shared + [5000], 1))
    h.run()
    kv = h.sched.kv
    assert (kv.cache.total_size, kv.allocator.num_free_slots) == (9, 7)
    h.add(make_req("a", prompt(5, 3000), 4))
    h.step()
    # X reuses 8 cached tokens and needs 3 more, but A holds 6 of the 7 free slots: X has to wait for A.
    h.add(make_req("x", shared + [6000, 6001, 6002], 1))
    h.step()
    # W's last token was not evicted for an admission that then failed.
    assert kv.cache.match_prefix(CacheKey(shared + [5000])).length == 9
    h.run()
    bound: set[int] = set()
    for plan in h.plans:
        assert set(plan.freed_req_pool_idxs) <= bound  # only slots some plan bound are freed
        assert set(plan.table_req.tolist()) <= bound | {n.req_pool_idx for n in plan.new_requests}
        bound |= {n.req_pool_idx for n in plan.new_requests}


# --- abort --------------------------------------------------------------------------------------------------


def test_abort_waiting_request(model) -> None:
    h = Harness(model, max_running_requests=1)
    h.add(make_req("a", prompt(5, 1000), 3), make_req("b", prompt(5, 2000), 3))
    h.step()
    assert [r.rid for r in h.sched.waiting] == ["b"]
    assert h.sched.abort("b") is True
    assert h.sched.abort("nope") is False
    outs = h.step()
    assert [o.rid for o in outs if o.rid == "b"] == ["b"]
    h.run()
    (out,) = h.outputs["b"]
    assert out.finished and out.token_ids == [] and out.completion_tokens == 0
    assert out.finish_reason == {"type": "abort", "message": "aborted"}
    assert all(row == ["a"] for row in h.rows)
    assert len(h.tokens("a")) == 3
    h.assert_no_leaks()


def test_abort_running_request_frees_its_kv_and_slot(model) -> None:
    h = Harness(model)
    a, b = make_req("a", prompt(10, 1000), 6), make_req("b", prompt(10, 2000), 6)
    h.add(a, b)
    h.step()
    h.step()
    idx_a = a.req_pool_idx
    assert h.sched.abort("a")
    kv = h.sched.kv
    assert a.req_pool_idx == -1 and len(a.kv_slots) == 0
    # Everything but B's own (uncached) slots is free or in the prefix cache; only B's prefix is locked.
    b_owned = len(b.kv_slots) - b.tree_len
    assert kv.allocator.num_free_slots + kv.cache.total_size + b_owned == kv.capacity
    assert kv.cache.protected_size == b.tree_len
    h.run()
    assert h.plans[2].freed_req_pool_idxs == [idx_a]
    assert h.rows[2:] == [["b"]] * 4
    assert h.finish("a") == {"type": "abort", "message": "aborted"}
    assert len(h.tokens("a")) == 2
    assert h.tokens("b") == run_alone(model, prompt(10, 2000), 6)
    h.assert_no_leaks()


def test_abort_while_the_step_runs(model) -> None:
    h = Harness(model)
    a, b = make_req("a", prompt(10, 1000), 4), make_req("b", prompt(10, 2000), 4)
    h.add(a, b)
    h.step()
    idx_a = a.req_pool_idx

    def execute_then_abort(plan: StepPlan) -> StepOutput:
        out = h.execute(plan)
        h.sched.abort("a")  # lands between the runner's answer and process()
        return out

    outs = h.step(execute_then_abort)
    assert [(o.rid, len(o.token_ids), o.finished) for o in outs] == [("a", 0, True), ("b", 1, False)]
    assert h.finish("a") == {"type": "abort", "message": "aborted"}
    assert len(a.output_ids) == 1  # the token computed for A in that step was dropped
    h.run()
    assert h.plans[2].freed_req_pool_idxs == [idx_a]
    assert h.rows[2:] == [["b"]] * 2
    assert h.tokens("b") == run_alone(model, prompt(10, 2000), 4)
    h.assert_no_leaks()


# --- n > 1 groups -------------------------------------------------------------------------------------------


def test_group_siblings_wait_for_the_leaders_prompt(model) -> None:
    ids = prompt(20)
    group = RequestGroup()
    h = Harness(model, chunked_prefill_size=8)
    h.add(*(make_req(f"g-{i}", ids, 2, group=group) for i in range(3)))
    h.run()
    assert h.rows[:4] == [["g-0"], ["g-0"], ["g-0"], ["g-0", "g-1", "g-2"]]
    fourth = h.plans[3]
    assert fourth.prefix_lens.tolist() == [20, 19, 19]
    assert fourth.extend_lens.tolist() == [1, 1, 1]
    assert fourth.sample.tolist() == [True, True, True]
    assert [n.req_pool_idx for n in fourth.new_requests] == [1, 2]
    assert fourth.table_req.tolist() == [1] * 19 + [2] * 19
    assert fourth.table_slot.tolist() == rng(1, 20) * 2
    assert [h.outputs[f"g-{i}"][0].cached_tokens for i in range(3)] == [0, 19, 19]
    assert h.tokens("g-1") == h.tokens("g-2") == h.tokens("g-0")
    h.assert_no_leaks()


def test_group_siblings_run_after_the_leader_is_aborted(model) -> None:
    group = RequestGroup()
    h = Harness(model, chunked_prefill_size=8)
    h.add(*(make_req(f"g-{i}", prompt(20), 2, group=group) for i in range(2)))
    h.step()  # the leader's first chunk; its prompt is not cached yet
    assert h.sched.abort("g-0")
    h.run(max_steps=20)
    assert len(h.tokens("g-1")) == 2


def test_group_with_no_new_tokens_finishes(model) -> None:
    group = RequestGroup()
    h = Harness(model)
    h.add(*(make_req(f"g-{i}", prompt(6), 0, group=group) for i in range(2)))
    h.run(max_steps=20)
    assert h.finish("g-1") == {"type": "length", "length": 0}


# --- finish reasons and validation --------------------------------------------------------------------------


def test_stop_token_ids_finish_with_the_matched_token(model) -> None:
    ids = prompt(8)
    full = run_alone(model, ids, 6)
    i = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    h = Harness(model)
    h.add(make_req("a", ids, 6, params={"stop_token_ids": [full[i]]}))
    h.run()
    assert h.tokens("a") == full[: i + 1]
    assert h.finish("a") == {"type": "stop", "matched": full[i]}
    h.assert_no_leaks()


def test_zero_new_tokens_finishes_after_prefill(model) -> None:
    h = Harness(model)
    h.add(make_req("a", prompt(7), 0))
    h.run()
    assert h.col("extend_lens") == [[7]] and h.col("sample") == [[True]]
    (out,) = h.outputs["a"]
    assert out.finished and out.token_ids == [] and out.completion_tokens == 0
    assert out.finish_reason == {"type": "length", "length": 0}
    assert h.sched.kv.cache.total_size == 7
    h.assert_no_leaks()


def test_context_length_ends_generation(model) -> None:
    h = Harness(model, context_length=32)
    h.add(make_req("a", prompt(28), 10))
    h.run()
    assert len(h.tokens("a")) == 4
    assert h.finish("a") == {"type": "length", "length": 4}
    h.assert_no_leaks()


def test_add_request_rejects_prompts_that_can_never_run(model) -> None:
    h = Harness(model, context_length=32)
    with pytest.raises(InvalidRequestError) as err:
        h.add(make_req("long", prompt(32)))
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError):
        h.add(make_req("empty", []))
    h.add(make_req("fits", prompt(31)))
    assert [r.rid for r in h.sched.waiting] == ["fits"]

    small = Harness(model, num_slots=17)  # 16 usable slots
    with pytest.raises(InvalidRequestError):
        small.add(make_req("big", prompt(16)))
    small.add(make_req("ok", prompt(15)))
    assert [r.rid for r in small.sched.waiting] == ["ok"]


# --- input logprobs -----------------------------------------------------------------------------------------


def _input_logprobs(h: Harness, rid: str) -> list[tuple[float | None, int]]:
    return [lp for o in h.outputs[rid] for lp in (o.input_logprobs or [])]


def _requested_positions(h: Harness, rid: str) -> list[int]:
    """Prompt positions whose logprob the plans asked for on behalf of ``rid``, in plan order."""
    out: list[int] = []
    for plan, rows in zip(h.plans, h.rows, strict=True):
        if rid not in rows:
            continue
        i = rows.index(rid)
        start, count = int(plan.input_logprob_start[i]), int(plan.input_logprob_counts[i])
        if start >= 0:
            first = int(plan.prefix_lens[i]) + start + 1  # row r of a chunk predicts position prefix + r + 1
            out.extend(range(first, first + count))
    return out


def test_input_logprob_rows_across_chunk_boundaries(model) -> None:
    ids = prompt(20)
    h = Harness(model, chunked_prefill_size=8)
    h.add(make_req("a", ids, 1, return_logprob=True, logprob_start_len=3))
    h.run()
    # Rows i of a chunk give the logprob of prompt position prefix + i + 1.
    assert h.col("input_logprob_start") == [[2], [0], [0]]
    assert h.col("input_logprob_counts") == [[6], [8], [3]]
    assert h.col("input_logprob_targets") == [ids[3:9], ids[9:17], ids[17:20]]
    assert _requested_positions(h, "a") == rng(3, 20)
    chunked = _input_logprobs(h, "a")
    assert [t for _, t in chunked] == ids[3:]
    assert all(lp is not None and lp <= 0.0 for lp, _ in chunked)
    h.assert_no_leaks()

    whole = Harness(model, chunked_prefill_size=None)
    whole.add(make_req("a", ids, 1, return_logprob=True, logprob_start_len=3))
    whole.run()
    assert whole.col("input_logprob_start") == [[2]] and whole.col("input_logprob_counts") == [[17]]
    np.testing.assert_allclose(
        [lp for lp, _ in chunked], [lp for lp, _ in _input_logprobs(whole, "a")], atol=1e-4
    )

    # From position 0: position 0 has no logprob (None); the rows start at position 1.
    zero = Harness(model, chunked_prefill_size=8)
    zero.add(make_req("a", ids, 1, return_logprob=True, logprob_start_len=0))
    zero.run()
    assert _requested_positions(zero, "a") == rng(1, 20)
    lps = _input_logprobs(zero, "a")
    assert lps[0] == (None, ids[0]) and [t for _, t in lps] == ids
    np.testing.assert_allclose([lp for lp, _ in lps[3:]], [lp for lp, _ in chunked], atol=1e-4)


def test_prefix_match_does_not_skip_requested_logprob_positions(model) -> None:
    ids = prompt(20)
    h = Harness(model)
    h.add(make_req("warm", ids, 2))
    h.run()
    h.add(make_req("a", ids, 1, return_logprob=True, logprob_start_len=5))
    h.run()
    plan = h.plans[-1]
    # Position 5's logprob comes from row 4, so only 4 tokens of the cached prompt are reused.
    assert plan.prefix_lens.tolist() == [4] and plan.extend_lens.tolist() == [16]
    assert plan.input_logprob_start.tolist() == [0] and plan.input_logprob_counts.tolist() == [15]
    assert h.outputs["a"][0].cached_tokens == 4

    ref = Harness(model, enable_prefix_cache=False)
    ref.add(make_req("a", ids, 1, return_logprob=True, logprob_start_len=5))
    ref.run()
    got, want = _input_logprobs(h, "a"), _input_logprobs(ref, "a")
    assert [t for _, t in got] == [t for _, t in want] == ids[5:]
    np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in want], atol=1e-4)
    h.assert_no_leaks()


def test_input_logprobs_survive_preemption_mid_prefill(model) -> None:
    ids = prompt(20, 2000)
    # 24 slots: B's third chunk does not fit beside A, so B waits; when A's decodes run out of room, B (the most
    # recent admission) is preempted halfway through its prompt and later resumes after the collected positions.
    h = Harness(
        model, num_slots=25, chunked_prefill_size=8, init_new_token_ratio=0.0, min_new_token_ratio=0.0
    )
    a = make_req("a", prompt(6, 1000), 18)
    b = make_req("b", ids, 1, return_logprob=True, logprob_start_len=1)
    h.add(a, b)
    h.run()
    assert b.num_retractions >= 1
    assert _requested_positions(h, "b") == rng(1, 20)  # each position once, across the preemption
    lps = _input_logprobs(h, "b")
    assert [t for _, t in lps] == ids[1:]
    ref = Harness(model)
    ref.add(make_req("b", ids, 1, return_logprob=True, logprob_start_len=1))
    ref.run()
    np.testing.assert_allclose([lp for lp, _ in lps], [lp for lp, _ in _input_logprobs(ref, "b")], atol=1e-4)
    assert h.tokens("b") == ref.tokens("b")
    assert h.tokens("a") == run_alone(model, prompt(6, 1000), 18)
    h.assert_no_leaks()
