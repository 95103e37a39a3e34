"""Structured outputs in the real Scheduler over a real ModelRunner (tiny random-weight Qwen2 with SmolLM2's
tokenizer): token masks in the plan, jump-forward verification rows, preemption and paged KV rollback, all
token-exact against step-by-step decoding and leak-free."""

from __future__ import annotations

import json
import re
import time

import pytest

from sgl_ray.scheduler.request import Req

from .scheduler_harness import EOS, Harness, make_req, prompt

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "identifier": {"type": "integer", "minimum": 0, "maximum": 99},
            "category": {"enum": ["alpha", "beta"]},
            "enabled": {"type": "boolean"},
        },
        "required": ["identifier", "category", "enabled"],
        "additionalProperties": False,
    }
)
REGEX = r"item-[0-9]{2} \((red|green)\)"


def _reqs() -> list[Req]:
    specs = [{"json_schema": SCHEMA}, {"regex": REGEX}, None, {"json_schema": SCHEMA}]
    out = []
    for i, spec in enumerate(specs):
        req = make_req(f"r{i}", prompt(8, 1000 * (i + 1)), 40, params=spec)
        if spec is not None:  # constrained requests end with their grammar (at EOS)
            req.sampling.ignore_eos = False
        out.append(req)
    return out


def _run(model, **config) -> Harness:
    h = Harness(model, **config)
    reqs = _reqs()
    h.add(*reqs)
    for r in reqs:  # compiles run on a worker thread: wait, so that every run schedules the same way
        if r.grammar_compile is not None:
            r.grammar_compile.result(timeout=60)
    h.run(max_steps=400)
    h.assert_no_leaks()
    return h


@pytest.fixture(scope="module")
def step_by_step(model) -> Harness:
    return _run(model, enable_jump_forward=False)


def test_masks_and_verification_rows_in_the_plan(model, step_by_step) -> None:
    h = _run(model)
    tok = h.sched.outputs.tokenizer
    for rid in ("r0", "r3"):
        text = tok.decode(h.tokens(rid)[:-1])
        assert json.loads(text)["category"] in ("alpha", "beta")
        assert h.finish(rid) == {"type": "stop", "matched": EOS}
    assert re.fullmatch(REGEX, tok.decode(h.tokens("r1")[:-1]))
    for rid in ("r0", "r1", "r2", "r3"):
        assert h.tokens(rid) == step_by_step.tokens(rid), rid
    masked = [p for p in h.plans if p.vocab_mask is not None]
    assert masked and all(p.vocab_mask.shape[0] == p.sample_row_counts().sum() for p in masked)
    verifying = [p for p in h.plans if len(p.sample_counts) and p.sample_counts.max() > 1]
    assert verifying  # jump-forward extends sampled several rows
    assert sum(o.decode_steps for o in (h.outputs["r0"][-1],)) < len(h.tokens("r0"))
    # the unconstrained request's rows allow every token
    for plan, rows in zip(h.plans, h.rows, strict=True):
        if plan.vocab_mask is not None and "r2" in rows:
            i = rows.index("r2")
            row = int(plan.sample_row_counts()[:i].sum())
            assert (plan.vocab_mask[row] == -1).all()


@pytest.mark.parametrize(("page_size", "num_slots"), [(1, 57), (4, 64)])
def test_preemption_and_rollback_stay_exact(model, step_by_step, page_size, num_slots) -> None:
    h = _run(
        model, num_slots=num_slots, page_size=page_size, init_new_token_ratio=0.0, min_new_token_ratio=0.0
    )
    assert h.sched.num_preemptions > 0
    for rid in ("r0", "r1", "r2", "r3"):
        assert h.tokens(rid) == step_by_step.tokens(rid), rid


def test_a_bad_grammar_is_rejected_before_admission(model) -> None:
    h = Harness(model)
    h.add(make_req("bad", prompt(4), 4, params={"regex": "(("}), make_req("ok", prompt(4, 5000), 4))
    deadline = time.monotonic() + 60
    while h.sched.has_work and time.monotonic() < deadline:  # the compile runs on a worker thread
        h.step()
        time.sleep(0.01)
    rejected = h.sched.take_rejections()
    assert [rid for rid, _ in rejected] == ["bad"] and rejected[0][1].param == "regex"
    assert len(h.tokens("ok")) == 4
    h.assert_no_leaks()
