"""Speculative decoding in the in-process engine on tiny random-weight Llamas: greedy outputs token-identical to
decoding without speculation for every drafter, in every scheduling regime (concurrent batches, prefix-cache hits,
tiny prefill chunks, preemption under a tiny KV pool), stops and lengths inside accepted runs, n > 1, seeds,
logprobs, LoRA, and the KV pool back to where it started after every test.

The drafters: NGRAM; STANDALONE with the target itself as the draft model (every draft must be accepted: the
strongest check that the draft model's KV, shared slot for slot with the target's, stays right); STANDALONE with a
perturbed copy of the target (some drafts kept, some rejected and rolled back)."""

from __future__ import annotations

import json
import random
import re

import pytest

import sgl_ray

K = 3  # speculative_num_steps of the STANDALONE engines
NEW = 24
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(rng.randrange(4, 50))] for _ in range(n)]


def _spec_options(name: str, tiny_llama_path: str, tiny_draft_path: str) -> dict:
    return {
        "self": dict(
            speculative_algorithm="STANDALONE",
            speculative_draft_model_path=tiny_llama_path,
            speculative_num_steps=K,
        ),
        "perturbed": dict(
            speculative_algorithm="STANDALONE",
            speculative_draft_model_path=tiny_draft_path,
            speculative_num_steps=4,
        ),
        "ngram": dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=4),
    }[name]


class Engines:
    """Engines built on first use and shut down at the end of the module."""

    def __init__(self, target: str, draft: str) -> None:
        self.target, self.draft = target, draft
        self._engines: dict[tuple, sgl_ray.Engine] = {}

    def get(self, spec: str | None, **options) -> sgl_ray.Engine:
        key = (spec, tuple(sorted(options.items())))
        if key not in self._engines:
            extra = _spec_options(spec, self.target, self.draft) if spec else {}
            engine = sgl_ray.Engine(self.target, **{"max_total_tokens": 4096, **options, **extra})
            assert_pool_restored(engine)
            self._engines[key] = engine
        return self._engines[key]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.shutdown()


@pytest.fixture(scope="module")
def engines(tiny_llama_path, tiny_draft_path):
    e = Engines(tiny_llama_path, tiny_draft_path)
    yield e
    e.close()


def assert_pool_restored(engine: sgl_ray.Engine) -> None:
    """Every KV slot is free again once the prefix cache lets go of what it holds (nothing leaked)."""
    assert engine.flush_cache()
    stats = engine.get_stats()
    assert stats["kv_free"] == stats["kv_capacity"], stats


def _spec(out: dict) -> dict:
    return {k: v for k, v in out["meta_info"].items() if k.startswith("spec_")}


@pytest.mark.parametrize("spec", ["self", "perturbed", "ngram"])
def test_greedy_outputs_identical(engines, spec):
    plain = engines.get(None)
    prompts = _prompts(8)
    ref = plain.generate(input_ids=prompts, sampling_params=GREEDY)
    if (
        spec == "ngram"
    ):  # a prompt that repeats a prompt and its continuation: NGRAM proposes the continuation
        prompts.append(prompts[0] + ref[0]["output_ids"] + prompts[0] + ref[0]["output_ids"][:2])
        ref.append(plain.generate(input_ids=prompts[-1], sampling_params=GREEDY))
    engine = engines.get(spec)
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in ref]
    metas = [_spec(o) for o in outs]
    assert all(m["spec_verify_ct"] > 0 for m in metas)
    proposed = sum(m["spec_proposed_drafts"] for m in metas)
    accepted = sum(m["spec_accepted_drafts"] for m in metas)
    assert proposed > 0
    if spec == "self":
        assert accepted == proposed
    elif spec == "perturbed":  # some kept, some rolled back
        assert 0 < accepted < proposed
    assert_pool_restored(engine)


def test_draft_equal_to_target_accepts_every_draft(engines):
    """With the target as its own draft model, each verify step emits num_steps + 1 tokens."""
    engine = engines.get("self")
    steps = 5
    params = {**GREEDY, "max_new_tokens": 1 + steps * (K + 1)}  # the first token comes from the prefill
    before = engine.get_stats()
    outs = engine.generate(input_ids=_prompts(4, seed=1), sampling_params=params)
    after = engine.get_stats()
    for out in outs:
        meta = out["meta_info"]
        assert meta["spec_verify_ct"] == steps
        assert meta["spec_accepted_drafts"] == meta["spec_proposed_drafts"] == steps * K
        assert meta["spec_accept_rate"] == 1.0
        assert meta["spec_accept_length"] == meta["completion_tokens"] / steps  # SGLang's definition
    verify_steps = after["spec_verify_steps"] - before["spec_verify_steps"]
    emitted = after["spec_emitted_tokens"] - before["spec_emitted_tokens"]
    assert verify_steps == 4 * steps and emitted / verify_steps == K + 1
    assert after["spec_num_draft_tokens"] == K + 1
    assert_pool_restored(engine)


def test_prefix_cache_hit_reuses_draft_kv(engines):
    """The second request's prompt comes from the prefix cache, target and draft KV alike: all drafts still hold."""
    plain, engine = engines.get(None), engines.get("self")
    first = _prompts(1, seed=2)[0]
    second = first + [123, 456, 789]
    for ids in (first, second):
        out = engine.generate(input_ids=ids, sampling_params=GREEDY)
        assert out["output_ids"] == plain.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
        assert out["meta_info"]["spec_accepted_drafts"] == out["meta_info"]["spec_proposed_drafts"]
    assert out["meta_info"]["cached_tokens"] >= len(first) - 1
    assert_pool_restored(engine)


@pytest.mark.parametrize(("spec", "page_size", "pool"), [("self", 1, 80), ("perturbed", 4, 96)])
def test_chunked_prefill_and_preemption(engines, spec, page_size, pool):
    """Prefill chunks of 8 tokens and a pool too small for the batch: requests are preempted and recomputed
    (rejected drafts are rolled back inside partly used pages too)."""
    prompts = _prompts(10, seed=3)
    ref = engines.get(None).generate(input_ids=prompts, sampling_params=GREEDY)
    engine = engines.get(spec, max_total_tokens=pool, chunked_prefill_size=8, page_size=page_size)
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in ref]
    assert engine.get_stats()["num_preemptions"] > 0
    if spec == "self":
        assert all(_spec(o)["spec_accepted_drafts"] == _spec(o)["spec_proposed_drafts"] for o in outs)
    assert_pool_restored(engine)


def test_stops_and_lengths_inside_an_accepted_run(engines):
    """A stop token, a stop string and max_new_tokens that fall inside a run of accepted drafts end the request
    at the same token as decoding without speculation."""
    plain, engine = engines.get(None), engines.get("self")
    tok = engine.tokenizer
    ids = _prompts(1, seed=4)[0]
    out = plain.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    # The prefill gives token 0 and each verify step 4 more (1-4, 5-8, ...): a stop at token i with i % 4 != 0
    # drops the accepted tokens after it.
    inside = [i for i in range(5, NEW) if i % (K + 1)]
    stop_at = next(i for i in inside if out[i] not in out[:i])
    stop_text = next(
        piece
        for i in inside
        if (piece := tok.decode(out[: i + 1])[len(tok.decode(out[:i])) :].strip())
        and piece not in tok.decode(out[:i])
    )
    cases = [
        {**GREEDY, "stop_token_ids": [out[stop_at]]},
        {**GREEDY, "stop": [stop_text]},
        {**GREEDY, "max_new_tokens": 10},
    ]
    for params in cases:
        want = plain.generate(input_ids=ids, sampling_params=params)
        got = engine.generate(input_ids=ids, sampling_params=params)
        assert got["output_ids"] == want["output_ids"], params
        assert got["text"] == want["text"]
        assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
        assert got["meta_info"]["completion_tokens"] < NEW
        assert got["meta_info"]["completion_tokens"] % (K + 1) != 1  # it ended inside a run
    assert_pool_restored(engine)


def test_n_samples_and_seeds(engines):
    """NGRAM keeps seeded sampling token-identical to decoding without speculation (the sampler's noise is a
    function of seed and position); a draft model keeps it reproducible whatever shares the batch."""
    prompts = _prompts(3, seed=5)
    sampled = {"temperature": 0.9, "top_k": 50, "max_new_tokens": 16, "ignore_eos": True, "seed": 7, "n": 3}
    ref = engines.get(None).generate(input_ids=prompts, sampling_params=sampled)
    ngram = engines.get("ngram").generate(input_ids=prompts, sampling_params=sampled)
    assert [o["output_ids"] for o in ngram] == [r["output_ids"] for r in ref]
    engine = engines.get("perturbed")
    together = engine.generate(input_ids=prompts, sampling_params=sampled)
    alone = engine.generate(input_ids=prompts[1], sampling_params=sampled)
    assert [o["output_ids"] for o in alone] == [o["output_ids"] for o in together[3:6]]
    assert len({tuple(o["output_ids"]) for o in together}) == 9  # n samples differ
    assert sum(_spec(o)["spec_accepted_drafts"] for o in together) > 0
    assert_pool_restored(engine)


@pytest.mark.parametrize("spec", ["self", "perturbed"])
def test_logprobs_match(engines, spec):
    ids = _prompts(1, seed=6)[0]
    kwargs = dict(sampling_params={**GREEDY, "max_new_tokens": 10}, return_logprob=True, top_logprobs_num=3)
    want = engines.get(None).generate(input_ids=ids, **kwargs)["meta_info"]
    got = engines.get(spec).generate(input_ids=ids, **kwargs)["meta_info"]
    assert len(got["output_token_logprobs"]) == 10
    for (lp, t), (lp2, t2) in zip(got["output_token_logprobs"], want["output_token_logprobs"], strict=True):
        assert t == t2 and lp == pytest.approx(lp2, abs=1e-4)
    for top, top2 in zip(got["output_top_logprobs"], want["output_top_logprobs"], strict=True):
        assert [i for _, i in top] == [i for _, i in top2]


def test_penalised_requests_speculate_beside_others(engines):
    """Penalties and min_new_tokens depend on each token's counts: their verify rows count the drafts before
    them (tests/speculative/test_spec_penalties.py has the cases where that decides the output). In one batch with
    a plain request, every one speculates with the outputs of decoding without speculation."""
    plain, engine = engines.get(None), engines.get("self")
    prompts = _prompts(2, seed=7)
    params = [{**GREEDY, "repetition_penalty": 1.3}, {**GREEDY, "min_new_tokens": 4}, GREEDY]
    ids = prompts[:1] * 2 + prompts[1:]
    want = plain.generate(input_ids=ids, sampling_params=params)
    got = engine.generate(input_ids=ids, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert all(_spec(o)["spec_verify_ct"] > 0 for o in got)
    assert_pool_restored(engine)


WORDS = "[a-z]+( [a-z]+)*"  # restrictive: most of a random model's unconstrained drafts break it
NO_MARKUP = "[^<>#{}]*"  # permissive: most drafts pass
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
    "required": ["id", "name"],
}


def constrained_params(new: int = NEW) -> list[dict]:
    greedy = {**GREEDY, "max_new_tokens": new}
    return [
        {**greedy, "regex": WORDS},
        {**greedy, "regex": NO_MARKUP},
        {**greedy, "json_schema": json.dumps(SCHEMA)},
        greedy,
    ]


@pytest.mark.parametrize("spec", ["self", "perturbed", "ngram"])
def test_constrained_requests_speculate(engines, spec):
    """Under a grammar every verify row samples under the grammar's mask after the drafts before it: a draft
    model's drafts come back from the runner before the step samples, and the masks are built from them. Greedy
    outputs equal decoding without speculation, constrained and unconstrained requests in one batch."""
    plain, engine = engines.get(None), engines.get(spec)
    prompts = _prompts(4, seed=9)
    params = constrained_params()
    want = plain.generate(input_ids=prompts, sampling_params=params)
    got = engine.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert re.fullmatch(WORDS + " ?", got[0]["text"]) and re.fullmatch(NO_MARKUP, got[1]["text"])
    assert all(_spec(o)["spec_verify_ct"] > 0 for o in got)
    if spec == "self":  # the target drafts for itself: its draft holds wherever the grammar allows its argmax
        meta = _spec(got[1])
        assert meta["spec_accepted_drafts"] > meta["spec_proposed_drafts"] // 2
    assert_pool_restored(engine)


def test_constrained_sampling_follows_the_grammar(engines):
    """Sampled requests of a draft model under a grammar: the acceptance test and the residual draw use the
    target's distribution under the row's mask, so every output is in the grammar; seeded ones repeat."""
    engine = engines.get("perturbed")
    prompts = _prompts(6, seed=10)
    sampled = {"temperature": 0.9, "max_new_tokens": NEW, "ignore_eos": True, "seed": 3}
    params = [{**sampled, "regex": WORDS}, {**sampled, "regex": "(yes|no|maybe)( (yes|no|maybe))*"}] * 3
    got = engine.generate(input_ids=prompts, sampling_params=params)
    assert all(re.fullmatch(WORDS + " ?", o["text"]) for o in got[::2])
    for o in got[1::2]:  # whole words, the last maybe cut short by max_new_tokens
        *words, last = o["text"].split(" ")
        assert set(words) <= {"yes", "no", "maybe"} and any(
            w.startswith(last) for w in ("yes", "no", "maybe")
        )
    assert sum(_spec(o)["spec_verify_ct"] for o in got) > 0
    again = engine.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in got]
    assert_pool_restored(engine)


def test_lora_on_the_target(tiny_llama_path, lora_adapters):
    """The target runs with an adapter, the draft model without: outputs equal the adapter's without
    speculation."""
    paths = [f"{n}={p}" for n, p in lora_adapters.items()][:2]
    names = [p.split("=")[0] for p in paths]
    prompts = _prompts(4, seed=8)
    loras = [names[0], names[1], None, names[0]]
    common = dict(lora_paths=paths, max_loras_per_batch=2, max_total_tokens=2048)
    with sgl_ray.Engine(tiny_llama_path, **common) as plain:
        want = plain.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=loras)
    spec = dict(speculative_algorithm="STANDALONE", speculative_draft_model_path=tiny_llama_path)
    with sgl_ray.Engine(tiny_llama_path, **common, **spec) as engine:
        got = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=loras)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        metas = [_spec(o) for o in got]
        assert (
            metas[2]["spec_accepted_drafts"] == metas[2]["spec_proposed_drafts"]
        )  # the base model: all kept
        assert metas[0]["spec_accepted_drafts"] < metas[0]["spec_proposed_drafts"]  # the adapter differs
        assert_pool_restored(engine)
