"""Overlap scheduling with speculative decoding, in-process: the scheduler plans a request's next verify step while
its current one runs, as if every draft in flight were kept; the runner starts the chunk where the rejected drafts
did, in their KV slots (``runner.ahead``), and the scheduler frees the worst-case slots it did not
need (``KVCacheManager.drop_tail``).

Greedy and seeded outputs equal those with ``disable_overlap_schedule`` and those without speculation, for draft
chains and trees of a perturbed draft model (drafts rejected at every depth), with preemption, pages, stops and
lengths inside accepted runs, aborts of requests running ahead, and grammars in the same batches; the KV pool is
back where it started after every test. NGRAM, whose drafts are looked up by the scheduler, keeps overlap off."""

from __future__ import annotations

import random
import re

import pytest

import sgl_ray
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.entrypoints.core import overlap_schedule

from .test_spec_engine import WORDS, Engines, assert_pool_restored, constrained_params

NEW = 20
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
SEEDED = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": NEW, "ignore_eos": True, "seed": 5}
STEPS = 4  # the perturbed draft model's speculative_num_steps (test_spec_engine)
SHAPES = {"chain": {}, "tree": dict(speculative_eagle_topk=2, speculative_num_draft_tokens=6)}


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def engines(tiny_llama_path, tiny_draft_path):
    e = Engines(tiny_llama_path, tiny_draft_path)
    yield e
    e.close()


def _get(engines: Engines, shape: str | None, overlap: bool = True, **options) -> sgl_ray.Engine:
    """A perturbed draft model drafting chains or trees (``shape``; None: no speculation)."""
    options = {**options, **(SHAPES[shape] if shape else {}), "disable_overlap_schedule": not overlap}
    return engines.get("perturbed" if shape else None, **options)


def _ids(outs: list[dict]) -> list[list[int]]:
    return [o["output_ids"] for o in outs]


def _overlapped(engine: sgl_ray.Engine) -> int:
    return engine.get_stats()["spec_overlapped_steps"]


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_outputs_equal_overlap_off_and_no_speculation(engines, shape):
    """Concurrent requests: greedy, overlap on gives the tokens of overlap off and of no speculation, with drafts
    rejected at various depths (the perturbed draft model), so chunks do start over rejected drafts. Seeded
    sampling is reproducible; it equals overlap off up to the last steps (near max_new_tokens a step planned
    ahead carries another number of drafts, and a draft model's sampled output depends on its drafts: only its
    distribution does not)."""
    prompts = _prompts(4, seed=1)
    plain = _get(engines, None, overlap=False)
    on, off = _get(engines, shape), _get(engines, shape, overlap=False)
    before = _overlapped(on)
    for params in (GREEDY, SEEDED):
        got = on.generate(input_ids=prompts, sampling_params=params)
        want = off.generate(input_ids=prompts, sampling_params=params)
        if params is GREEDY:
            assert _ids(got) == _ids(want)
            assert _ids(got) == _ids(plain.generate(input_ids=prompts, sampling_params=params))
        else:
            assert _ids(got) == _ids(on.generate(input_ids=prompts, sampling_params=params))
            head = NEW - STEPS - 2  # before the last verify steps
            assert [ids[:head] for ids in _ids(got)] == [ids[:head] for ids in _ids(want)]
        metas = [o["meta_info"] for o in got]
        proposed = sum(m["spec_proposed_drafts"] for m in metas)
        accepted = sum(m["spec_accepted_drafts"] for m in metas)
        assert 0 < accepted < proposed  # some drafts kept, some rejected
    overlapped = _overlapped(on) - before
    assert overlapped > len(prompts) * 2, overlapped  # most verify steps were planned during the previous one
    assert _overlapped(off) == 0
    assert_pool_restored(on)


@pytest.mark.parametrize(("shape", "page_size", "pool"), [("chain", 1, 96), ("tree", 4, 96)])
def test_preemption_and_pages(engines, shape, page_size, pool):
    """A pool too small for the batch, prefill chunks of 8: requests are preempted (never while a step of theirs
    runs) and resumed; worst-case slots past rejected drafts are given back inside partly used pages too."""
    prompts = _prompts(10, seed=2)
    want = _get(engines, None, overlap=False).generate(input_ids=prompts, sampling_params=GREEDY)
    engine = _get(engines, shape, max_total_tokens=pool, chunked_prefill_size=8, page_size=page_size)
    got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert _ids(got) == _ids(want)
    stats = engine.get_stats()
    assert stats["num_preemptions"] > 0 and stats["spec_overlapped_steps"] > 0
    assert_pool_restored(engine)


def test_lengths_and_stops_while_running_ahead(engines):
    """max_new_tokens and stop tokens that end a request inside an accepted run, while its next step already
    runs: that step's result is dropped and its KV freed; the output is what decoding without speculation gives."""
    plain, engine = _get(engines, None, overlap=False), _get(engines, "chain")
    prompts = _prompts(6, seed=3)
    full = plain.generate(input_ids=prompts, sampling_params=GREEDY)
    params = (
        [{**GREEDY, "max_new_tokens": n} for n in (1, 2, 5, 7)]
        + [  # a stop token first seen mid-output
            {**GREEDY, "stop_token_ids": [next(t for i, t in enumerate(ids) if i >= 6 and t not in ids[:i])]}
            for ids in _ids(full[4:])
        ]
    )
    want = plain.generate(input_ids=prompts, sampling_params=params)
    got = engine.generate(input_ids=prompts, sampling_params=params)
    assert _ids(got) == _ids(want)
    assert [o["meta_info"]["finish_reason"] for o in got] == [o["meta_info"]["finish_reason"] for o in want]
    assert [len(o["output_ids"]) for o in got[:4]] == [1, 2, 5, 7]
    assert all(o["meta_info"]["completion_tokens"] < NEW for o in got[4:])
    assert_pool_restored(engine)


def test_abort_while_running_ahead(engines):
    """A stream abandoned mid-way is aborted with a step of it in flight; the others finish unchanged."""
    engine = _get(engines, "chain")
    prompts = _prompts(3, seed=4)
    want = _get(engines, None, overlap=False).generate(input_ids=prompts[1:], sampling_params=GREEDY)
    stream = engine.generate(
        input_ids=prompts[0], sampling_params={**GREEDY, "max_new_tokens": 400}, stream=True
    )
    next(stream)
    next(stream)
    got = engine.generate(input_ids=prompts[1:], sampling_params=GREEDY)
    stream.close()
    assert _ids(got) == _ids(want)
    stats = engine.get_stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert_pool_restored(engine)


def test_constrained_requests_among_running_ahead_ones(engines):
    """Constrained requests wait for their tokens (no run-ahead under a grammar) but still speculate: their
    drafts come back from the runner and their masks are built from them while other requests' steps run
    ahead."""
    plain, engine = _get(engines, None, overlap=False), _get(engines, "chain")
    prompts = _prompts(8, seed=5)
    params = constrained_params(NEW) * 2
    want = plain.generate(input_ids=prompts, sampling_params=params)
    before = _overlapped(engine)
    got = engine.generate(input_ids=prompts, sampling_params=params)
    assert _ids(got) == _ids(want)
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in got)
    assert _overlapped(engine) > before
    assert re.fullmatch(WORDS + " ?", got[0]["text"])
    assert_pool_restored(engine)


def test_ngram_keeps_overlap_off():
    """The scheduler looks NGRAM drafts up in the tokens it has, which lack those in flight."""
    assert not overlap_schedule(EngineArgs(speculative_algorithm="NGRAM"))
    assert overlap_schedule(EngineArgs(speculative_algorithm="STANDALONE", speculative_draft_model_path="d"))
    assert overlap_schedule(EngineArgs())
    assert not overlap_schedule(EngineArgs(disable_overlap_schedule=True))
