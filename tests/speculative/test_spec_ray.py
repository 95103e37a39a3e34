"""Speculative decoding over the Ray shard actors with two tensor-parallel shards: NGRAM and EAGLE (with overlap
scheduling: the shards run lagged, and a constrained step's drafts come back with the answer of the call that sent
it). Greedy outputs are token-identical to transformers on the same weights (under grammars: to the in-process
engine), seeded sampled ones to the in-process engine without speculation; every shard of the group emits the same tokens and accepted lengths (their output digests agree); the
KV pool is back where it started after the requests. Pipeline parallelism is refused at start with a typed error.

Each engine start costs most of these tests' time (three actors each importing torch), so there are two: one per
drafter, shared by the tests of that drafter."""

from __future__ import annotations

import random
import re

import pytest
import ray

import sgl_ray
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.errors import UnsupportedFeatureError

from ..conftest import GreedyReference, _hf_model
from .eagle_heads import copy_head_of, copy_target
from .test_spec_engine import WORDS, assert_pool_restored, constrained_params

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NEW = 16
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
SAMPLED = {"temperature": 0.3, "top_p": 0.9, "max_new_tokens": NEW, "ignore_eos": True, "seed": 11}
OPTIONS = dict(tp_size=2, max_total_tokens=2048)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(rng.randrange(4, 24))] for _ in range(n)]


def _repeated(prompts: list[list[int]], reference: GreedyReference) -> list[list[int]]:
    """Each prompt, its greedy continuation and the prompt again: NGRAM drafts the continuation."""
    return [p + reference(p, NEW) + p for p in prompts]


def _shard_digests(engine: sgl_ray.Engine) -> list[int]:
    scheduler = engine._core.scheduler_actor()
    return ray.get([h.output_digest.remote() for h in ray.get(scheduler.shard_handles.remote())])


def _assert_shards_agree(engine: sgl_ray.Engine) -> None:
    digests = _shard_digests(engine)
    assert len(digests) == 2 and digests[0] != 0
    assert digests[0] == digests[1], digests  # the same sampled tokens and emitted counts on both shards


def _spec_counts(outs: list[dict]) -> tuple[int, int, int]:
    metas = [o["meta_info"] for o in outs]
    return (
        min(m["spec_verify_ct"] for m in metas),
        sum(m["spec_proposed_drafts"] for m in metas),
        sum(m["spec_accepted_drafts"] for m in metas),
    )


@pytest.fixture(scope="module")
def ngram_engine(ray_cluster, ngram_target):
    with sgl_ray.Engine(ngram_target, speculative_algorithm="NGRAM", **OPTIONS) as engine:
        yield engine


@pytest.fixture(scope="module")
def ngram_reference(ngram_target) -> GreedyReference:
    return GreedyReference(_hf_model(ngram_target))


def test_ngram_greedy_over_tensor_parallel_shards(ngram_engine, ngram_reference):
    base = _prompts(4)
    prompts = base + _repeated(base, ngram_reference)
    outs = ngram_engine.generate(input_ids=prompts, sampling_params=GREEDY)
    for ids, out in zip(prompts, outs, strict=True):
        assert out["output_ids"] == ngram_reference(ids, NEW)
    verify_ct, proposed, accepted = _spec_counts(outs)
    assert verify_ct > 0 and 0 < accepted < proposed  # drafts kept and drafts rolled back
    stats = ngram_engine.get_stats()
    assert stats["spec_algorithm"] == "NGRAM" and stats["spec_accepted_drafts"] >= accepted
    assert not stats["overlap_schedule"]  # NGRAM's drafts are looked up in the tokens the scheduler has
    _assert_shards_agree(ngram_engine)
    assert_pool_restored(ngram_engine)


def test_ngram_seeded_sampling_equals_in_process_without_speculation(
    ngram_engine, ngram_target, ngram_reference
):
    """NGRAM drafts are deterministic: a seeded sampled request draws exactly the tokens that decoding without
    speculation draws for the same seed."""
    base = _prompts(4, seed=1)
    prompts = base + _repeated(base, ngram_reference)
    with sgl_ray.Engine(ngram_target, max_total_tokens=2048) as plain:
        want = plain.generate(input_ids=prompts, sampling_params=SAMPLED)
    got = ngram_engine.generate(input_ids=prompts, sampling_params=SAMPLED)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert _spec_counts(got)[2] > 0  # drafts kept at sampled rows
    _assert_shards_agree(ngram_engine)
    assert_pool_restored(ngram_engine)


def test_eagle_greedy_over_tensor_parallel_shards(ray_cluster, smollm2_path, tmp_path_factory):
    """An EAGLE head on every shard, reading the shard's (all-reduced) hidden states and sharing its slices of the
    target's embedding and LM head. The head reproduces its one-layer target, so most drafts are kept: the head's
    KV and hidden-state pools stay aligned with the target's across the shards' rollbacks: each request keeps as
    many drafts as in the in-process engine."""
    d = tmp_path_factory.mktemp("spec_ray_eagle")
    target = copy_target(d / "target", smollm2_path)
    head = copy_head_of(d / "head", target)
    reference = GreedyReference(_hf_model(target))
    prompts = _prompts(6, seed=2)
    spec = dict(
        speculative_algorithm="EAGLE",
        speculative_draft_model_path=head,
        speculative_num_steps=3,
        chunked_prefill_size=16,  # prompts in chunks, mixed with other requests' verify steps
        max_total_tokens=2048,
    )
    constrained = constrained_params(NEW)
    with sgl_ray.Engine(target, **spec) as one:
        alone = one.generate(input_ids=prompts, sampling_params=GREEDY)
        alone_constrained = one.generate(input_ids=prompts[:4], sampling_params=constrained)
    counts = ("spec_verify_ct", "spec_proposed_drafts", "spec_accepted_drafts")
    with sgl_ray.Engine(target, tp_size=2, **spec) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        for ids, out, one in zip(prompts, outs, alone, strict=True):
            assert out["output_ids"] == one["output_ids"] == reference(ids, NEW)
            assert [out["meta_info"][k] for k in counts] == [one["meta_info"][k] for k in counts]
        verify_ct, proposed, accepted = _spec_counts(outs)
        assert verify_ct > 0 and proposed // 3 < accepted < proposed
        # under grammars: the output shard answers with the drafts, the masks built from them go to every shard
        outs = engine.generate(input_ids=prompts[:4], sampling_params=constrained)
        for out, one in zip(outs, alone_constrained, strict=True):
            assert out["output_ids"] == one["output_ids"] and out["meta_info"]["spec_verify_ct"] > 0
            assert [out["meta_info"][k] for k in counts] == [one["meta_info"][k] for k in counts]
        assert re.fullmatch(WORDS + " ?", outs[0]["text"])
        stats = engine.get_stats()  # the shards ran lagged: verify steps planned while the previous one ran
        assert stats["overlap_schedule"] and stats["spec_overlapped_steps"] > 0, stats
        _assert_shards_agree(engine)
        assert_pool_restored(engine)


def test_pipeline_parallel_speculation_is_refused():
    with pytest.raises(UnsupportedFeatureError, match="pp_size") as info:
        EngineArgs(speculative_algorithm="NGRAM", tp_size=2, pp_size=2)
    assert info.value.param == "pp_size"
    with pytest.raises(UnsupportedFeatureError) as info:
        sgl_ray.Engine("unused", speculative_algorithm="EAGLE", speculative_draft_model_path="h", pp_size=2)
    assert info.value.param == "pp_size"
