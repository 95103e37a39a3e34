"""Overlap scheduling over a real ModelRunner: step N+1 is planned and launched before step N's results are
processed, with placeholder input tokens. Outputs equal the synchronous schedule's; nothing leaks when a request's
token ends it while its next step is already in flight."""

from __future__ import annotations

from collections import deque

from sgl_ray.scheduler.plan import FUTURE_TOKEN

from .scheduler_harness import Harness, make_req, prompt, rng


def run_overlapped(h: Harness, max_steps: int = 300) -> int:
    """The engine loop's overlap pattern: keep two steps in flight; returns how many plans ran ahead."""
    runner, sched = h.runner, h.sched
    in_flight: deque = deque()
    ahead = 0
    for _ in range(max_steps):
        if not sched.has_work and not in_flight:
            return ahead
        if len(in_flight) < 2:
            batch = sched.schedule()
            if batch.worth_running:
                h.plans.append(batch.plan)
                ahead += bool((batch.plan.input_ids == FUTURE_TOKEN).any())
                in_flight.append((batch, runner.launch(batch.plan)))
                continue
        if not in_flight:
            outs = sched.take_pending_outputs()
        else:
            batch, pending = in_flight.popleft()
            outs = sched.process(batch, runner.collect(pending))
        for o in outs:
            h.outputs[o.rid].append(o)
    raise AssertionError("still working")


def _requests(stop_token: int | None):
    reqs = [make_req(f"r{i}", prompt(5 + 3 * i, 1000 * (i + 1)), new=4 + 2 * i) for i in range(4)]
    if stop_token is not None:  # r1 ends early on a token it samples, while its next step is in flight
        reqs[1] = make_req("r1", prompt(8, 2000), new=10, params={"stop_token_ids": [stop_token]})
    return reqs


def test_overlap_matches_synchronous_schedule_and_leaks_nothing(model) -> None:
    sync = Harness(model)
    sync.add(*_requests(None))
    sync.run()
    stop_token = sync.tokens("r1")[2]

    for overlap in (False, True):
        ref = Harness(model)
        ref.add(*_requests(stop_token))
        ref.run()
        h = Harness(model, overlap=overlap)
        h.add(*_requests(stop_token))
        ahead = run_overlapped(h)
        assert (ahead > 0) == overlap
        for rid in ("r0", "r1", "r2", "r3"):
            assert h.tokens(rid) == ref.tokens(rid), rid
            assert h.finish(rid) == ref.finish(rid)
        assert ref.finish("r1")["type"] == "stop" and len(ref.tokens("r1")) == 3
        h.assert_no_leaks()


def test_ahead_steps_use_placeholders_only_for_tokens_in_flight(model) -> None:
    h = Harness(model, overlap=True)
    h.add(make_req("a", rng(100, 110), new=3))
    run_overlapped(h)
    # Prefill (10 tokens), then decodes planned while the previous step ran: their inputs are placeholders, and
    # no decode is planned past the request's last token (3 new tokens: 2 decode steps).
    assert [p.extend_lens.tolist() for p in h.plans] == [[10], [1], [1]]
    assert [p.input_ids.tolist() for p in h.plans[1:]] == [[FUTURE_TOKEN], [FUTURE_TOKEN]]
    assert [p.prefix_lens.tolist() for p in h.plans] == [[0], [10], [11]]
    assert len(h.tokens("a")) == 3
    h.assert_no_leaks()
