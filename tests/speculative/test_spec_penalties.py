"""Speculative decoding of requests with penalties (repetition, frequency, presence) and ``min_new_tokens``.

Each verify row samples as if the drafts before it (a tree node: its path from the root) were already emitted, and
the sampling state then records every emitted token. Checked here: the offsets row by row against a state updated
token by token (chains and trees, CPU); and in engines on the tiny random Llama, greedy outputs token-identical to
decoding without speculation for NGRAM chains and trees, STANDALONE chains and trees (the target as its own draft
model, which drafts without penalties) and an EAGLE head, seeded sampled outputs identical for NGRAM, every such
request really speculating, and the KV pool back where it started.

A random model over 49k tokens almost never repeats a token, so penalties would change nothing: the requests raise
a few tokens far above the rest with ``logit_bias``, and the penalties then decide, token by token, which of them
comes next — short repeating patterns that NGRAM drafts and the penalties break, so whether a row counts the
drafts before it changes the output.
"""

from __future__ import annotations

import collections
import random
from typing import NamedTuple

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import sgl_ray
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.sampling.penalties import process_logits
from sgl_ray.sampling.state import SamplingState
from sgl_ray.scheduler.plan import StepPlan
from sgl_ray.speculative.draft_model import draft_sampling
from sgl_ray.speculative.verify import draft_paths, ngram_drafts_of, verify_row_offsets

from .eagle_heads import save_eagle_head
from .test_spec_engine import assert_pool_restored
from .test_spec_sampling import _chi2, _chi2_critical

EOS = 2  # the tiny models' eos_token_id
BIASED = [45001, 45002, 45003, 45004]  # no prompt holds them
NEW, MIN = 24, 12
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


def _raised(tokens: list[int], by: float) -> dict[int, float]:
    return dict.fromkeys(tokens, by)


CASES = {
    "frequency_presence": {
        **GREEDY,
        "frequency_penalty": 1.0,
        "presence_penalty": 0.5,
        "logit_bias": _raised(BIASED, 20.0),
    },
    "repetition": {**GREEDY, "repetition_penalty": 1.5, "logit_bias": _raised(BIASED, 20.0)},
    # the model's own choices, penalised: a drafter that ignores logit_bias (a draft model's tree) drafts them
    "all_penalties": {**GREEDY, "repetition_penalty": 1.3, "frequency_penalty": 0.8, "presence_penalty": 0.4},
    # EOS above everything: without the minimum the request ends at its first token
    "min_new_tokens": {
        **GREEDY,
        "ignore_eos": False,
        "min_new_tokens": MIN,
        "logit_bias": {BIASED[0]: 20.0, EOS: 25.0},
    },
}

SPECS = {
    "ngram_chain": dict(
        speculative_algorithm="NGRAM", speculative_num_draft_tokens=5, speculative_ngram_max_bfs_breadth=1
    ),
    "ngram_tree": dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=6),
    "draft_chain": dict(speculative_algorithm="STANDALONE", speculative_num_steps=3),
    "draft_tree": dict(
        speculative_algorithm="STANDALONE",
        speculative_num_steps=3,
        speculative_eagle_topk=2,
        speculative_num_draft_tokens=6,
    ),
    "eagle": dict(speculative_algorithm="EAGLE", speculative_num_steps=3),
}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


# ---- the offsets, row by row (CPU) ------------------------------------------------------------------------------

V = 16
PEN = SamplingParams(
    temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4, min_new_tokens=3
)
MIN_ONLY = SamplingParams(temperature=0.0, min_new_tokens=4)
# slot -> (params, prompt, output so far)
REQUESTS = {
    0: (SamplingParams(), [9], []),
    1: (PEN, [3, 4], [7]),
    2: (MIN_ONLY, [5], [6, 6]),  # rows at 2, 3, 4 generated tokens: EOS masked, masked, allowed
    3: (SamplingParams(temperature=0.0), [8], [8]),  # no penalties: its rows count nothing
}


def _admitted(state: SamplingState) -> SamplingState:
    for slot, (params, prompt, output) in REQUESTS.items():
        state.set_request(slot, params, seed=0, eos_token_ids=[EOS], prompt_ids=prompt, output_ids=output)
    return state


def _expected(logits: torch.Tensor, slots: list[int], counted: list[list[int]]) -> torch.Tensor:
    """Each row processed alone by a state updated token by token with the row's counted tokens."""
    rows = []
    for i, (slot, extra) in enumerate(zip(slots, counted, strict=True)):
        st = _admitted(SamplingState(max_reqs=4, vocab_size=V))
        for t in extra:
            st.update(torch.tensor([slot]), torch.tensor([t]))
        idx = np.array([slot])
        rows.append(process_logits(logits[i : i + 1].clone(), st, torch.from_numpy(idx), st.plan(idx))[0])
    return torch.stack(rows)


def _plan(chunks: dict[int, list[int]], parents: list[int] | None = None) -> StepPlan:
    """A step over every slot of REQUESTS: ``chunks[slot]`` its verify chunk ``[x, drafts...]``, the others plain
    decodes of token 1."""
    slots = np.array(list(REQUESTS))
    rows = [chunks.get(int(s), [1]) for s in slots]
    lens = np.array([len(r) for r in rows])
    return StepPlan(
        step_id=0,
        req_pool_idxs=slots,
        prefix_lens=np.full(len(slots), 10),
        extend_lens=lens,
        input_ids=np.concatenate(rows),
        out_cache_loc=np.arange(int(lens.sum())),
        sample=np.ones(len(slots), dtype=bool),
        sample_counts=lens,
        draft_lens=lens - 1,
        draft_parents=np.array(parents if parents is not None else [], dtype=np.int64),
    )


def _check(plan: StepPlan, counted: list[list[int]]) -> None:
    state = _admitted(SamplingState(max_reqs=4, vocab_size=V))
    paths = draft_paths(plan, ngram_drafts_of(plan, torch.device("cpu")), state)
    assert paths is not None
    offsets = verify_row_offsets(plan, paths)
    slots = np.repeat(plan.req_pool_idxs, plan.sample_counts)
    logits = torch.randn(len(slots), V, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, EOS] += 6.0  # EOS wins wherever min_new_tokens does not mask it
    got = process_logits(logits.clone(), state, torch.from_numpy(slots), state.plan(slots), offsets)
    want = _expected(logits, slots.tolist(), counted)
    torch.testing.assert_close(got, want)
    assert (got[:, EOS] == float("-inf")).any() and (got[:, EOS] > 0).any()


def test_chain_rows_count_the_drafts_before_them():
    """Row i of a chain ``[x, d_1..d_k]`` sees the penalties and the min_new_tokens mask after d_1..d_i; rows of
    requests whose sampling reads no counts are untouched."""
    plan = _plan({1: [7, 5, 5, 7], 2: [6, 6, 9], 3: [8, 8, 8]})
    counted = [[], [], [5], [5, 5], [5, 5, 7], [], [6], [6, 9], [], [8], [8, 8]]
    _check(plan, counted)


def test_tree_rows_count_their_path():
    """A tree row counts its ancestors and itself, not its siblings' branches."""
    nodes, parents = [5, 5, 6, 7, 5], [0, 1, 0, 2, 3]  # chunk rows: x, n1 .. n5
    plan = _plan({1: [7, *nodes], 2: [6, 6, 9]}, parents=parents + [0, 1])
    path = [[]]
    for node, parent in zip(nodes, parents, strict=True):
        path.append(path[parent] + [node])
    counted = [[], *path, [], [6], [6, 9], []]
    _check(plan, counted)


def test_update_records_every_emitted_token():
    """``update`` with an emitted mask (a verify entry's tokens, one slot several times) leaves the counts a
    token-by-token update leaves; and the draft model admits requests without what reads their output."""
    params = SamplingParams(frequency_penalty=0.5, min_new_tokens=2)
    at_once, one_by_one = SamplingState(max_reqs=2, vocab_size=V), SamplingState(max_reqs=2, vocab_size=V)
    for st in (at_once, one_by_one):
        st.set_request(1, params, seed=0, eos_token_ids=[EOS], prompt_ids=[3])
    slots, tokens = torch.tensor([1, 1, 1, 1]), torch.tensor([4, 4, 6, 9])
    at_once.update(slots, tokens, torch.tensor([True, True, True, False]))
    for t in (4, 4, 6):
        one_by_one.update(torch.tensor([1]), torch.tensor([t]))
    assert int(at_once.num_generated[1]) == int(one_by_one.num_generated[1]) == 3
    assert at_once.output_counts is not None and one_by_one.output_counts is not None
    assert torch.equal(at_once.output_counts, one_by_one.output_counts)
    assert at_once.output_counts[1, 4] == 2 and at_once.output_counts[1, 9] == 0
    neutral = draft_sampling(params)
    assert not neutral.needs_penalties and neutral.min_new_tokens == 0
    assert draft_sampling(SamplingParams(temperature=0.3)) == SamplingParams(temperature=0.3)


# ---- engines --------------------------------------------------------------------------------------------------


class Engines:
    """The tiny Llama without speculation and with each drafter of SPECS, built on first use."""

    def __init__(self, target: str, eagle_head: str) -> None:
        self.target, self.eagle_head = target, eagle_head
        self._engines: dict[str | None, sgl_ray.Engine] = {}

    def get(self, spec: str | None) -> sgl_ray.Engine:
        if spec not in self._engines:
            extra = dict(SPECS[spec]) if spec else {}
            if spec is not None and spec.startswith("draft"):
                extra["speculative_draft_model_path"] = self.target  # drafts the target's unpenalized argmax
            elif spec == "eagle":
                extra["speculative_draft_model_path"] = self.eagle_head
            self._engines[spec] = sgl_ray.Engine(self.target, max_total_tokens=4096, **extra)
        return self._engines[spec]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.shutdown()


@pytest.fixture(scope="module")
def engines(tiny_llama_path, tmp_path_factory):
    head = save_eagle_head(tmp_path_factory.mktemp("penalties_eagle"), tiny_llama_path, "EAGLE", seed=1)
    e = Engines(tiny_llama_path, head)
    yield e
    e.close()


def _meta(outs: list[dict], key: str) -> list[int]:
    return [o["meta_info"][key] for o in outs]


class Reference(NamedTuple):
    prompts: list[list[int]]
    params: list[dict]
    cases: list[str]  # each request's case ("" : no penalties)
    outputs: list[list[int]]  # without speculation


@pytest.fixture(scope="module")
def reference(engines) -> Reference:
    """The greedy cases without speculation, each on three prompts, and a request without penalties."""
    cases = [name for name in CASES for _ in range(3)] + [""]
    params = [CASES[c] if c else GREEDY for c in cases]
    prompts = _prompts(len(cases), seed=1)
    plain = engines.get(None)
    outs = [o["output_ids"] for o in plain.generate(input_ids=prompts, sampling_params=params)]
    # The cases matter. The minimum holds back EOS, which ends the request at once without it:
    first = cases.index("min_new_tokens")
    early = {**CASES["min_new_tokens"], "min_new_tokens": 0}
    assert plain.generate(input_ids=prompts[first], sampling_params=early)["output_ids"] == [EOS]
    for out, case in zip(outs, cases, strict=True):
        if case == "min_new_tokens":
            assert len(out) == MIN + 1 and out[-1] == EOS and EOS not in out[:-1], out
    # the penalties decide which raised token comes next
    raised = [i for i, c in enumerate(cases) if c in ("frequency_presence", "repetition")]
    unpenalized = {**GREEDY, "logit_bias": _raised(BIASED, 20.0)}
    without = plain.generate(input_ids=[prompts[i] for i in raised], sampling_params=unpenalized)
    for i, u in zip(raised, without, strict=True):
        assert set(outs[i]) <= set(BIASED) and outs[i] != u["output_ids"]
    return Reference(prompts, params, cases, outs)


@pytest.mark.parametrize("spec", list(SPECS))
def test_greedy_outputs_identical(engines, reference, spec):
    engine = engines.get(spec)
    got = engine.generate(input_ids=reference.prompts, sampling_params=reference.params)
    assert [o["output_ids"] for o in got] == reference.outputs
    penalised = [o for o, case in zip(got, reference.cases, strict=True) if case]
    assert all(ct > 0 for ct in _meta(penalised, "spec_verify_ct"))  # they speculated
    if spec != "eagle":  # drafts that copy the output, or the target's own argmax: some hold
        assert sum(_meta(penalised, "spec_accepted_drafts")) > 0
    assert_pool_restored(engine)


@pytest.mark.parametrize("spec", ["ngram_chain", "ngram_tree"])
def test_seeded_sampling_identical(engines, spec):
    """NGRAM drafts are deterministic and the sampler's noise is a function of seed and position: seeded sampled
    requests with penalties give the tokens of decoding without speculation."""
    prompts = _prompts(4, seed=2)
    sampled = {
        **CASES["frequency_presence"],
        "temperature": 1.0,
        "presence_penalty": 0.2,
        "max_new_tokens": NEW,
    }
    params = [{**sampled, "seed": s} for s in range(3)] + [
        {**CASES["repetition"], "temperature": 0.7, "seed": 9}
    ]
    want = engines.get(None).generate(input_ids=prompts, sampling_params=params)
    engine = engines.get(spec)
    got = engine.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert all(ct > 0 for ct in _meta(got, "spec_verify_ct"))
    assert sum(_meta(got, "spec_accepted_drafts")) > 0
    assert_pool_restored(engine)


# ---- sampling: the draft model's acceptance test under penalties -------------------------------------------------

PROMPT = [11, 22, 33, 44, 55, 66]
RAISED = [101, 202, 303]  # the small model's three candidates (top-k 3)
SAMPLED = {
    "temperature": 1.5,
    "top_k": 3,
    "frequency_penalty": 1.0,
    "presence_penalty": 0.5,
    "repetition_penalty": 1.1,
    "logit_bias": _raised(RAISED, 20.0),
    "max_new_tokens": 4,
    "ignore_eos": True,
}


def _exact_penalised(path: str, tokens: int) -> dict[tuple[int, ...], float]:
    """P(first ``tokens`` tokens) under SAMPLED, enumerated with transformers and the processors' formulas."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def next_dist(seq: tuple[int, ...]) -> list[tuple[int, float]]:
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + list(seq)])).logits[0, -1]
        logits[RAISED] += 20.0
        r = SAMPLED["repetition_penalty"]
        for t in set(PROMPT) | set(seq):
            logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
        for t in set(seq):
            logits[t] -= SAMPLED["frequency_penalty"] * seq.count(t) + SAMPLED["presence_penalty"]
        top, idx = (logits / SAMPLED["temperature"]).topk(SAMPLED["top_k"])
        return list(zip(idx.tolist(), torch.softmax(top, -1).tolist(), strict=True))

    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(tokens):
        out = {seq + (t,): p * q for seq, p in out.items() for t, q in next_dist(seq)}
    return out


def test_draft_model_sampling_follows_the_penalised_target(small_vocab_pair):
    """A draft model drafts without penalties; the acceptance test and the residual draw use the target's
    distribution after the drafts before each row: the first three tokens follow the penalised distribution
    (chi-square at p = 1e-6, as in test_spec_sampling.py)."""
    target, draft = small_vocab_pair
    n, tokens = 1500, 3
    exact = _exact_penalised(target, tokens)
    # sequences the penalties make rare share one cell, so that every cell is expected often enough
    rare = {seq for seq, p in exact.items() if p * n < 8}
    cells = {seq: p for seq, p in exact.items() if seq not in rare} | {"rare": sum(exact[s] for s in rare)}
    assert len(cells) > 10 and cells["rare"] * n > 8
    spec = dict(
        speculative_algorithm="STANDALONE", speculative_draft_model_path=draft, speculative_num_steps=2
    )
    params = [{**SAMPLED, "seed": s} for s in range(n)]
    with sgl_ray.Engine(target, max_total_tokens=8192, skip_tokenizer_init=True, **spec) as engine:
        outs = engine.generate(input_ids=[PROMPT] * n, sampling_params=params)
        stats = engine.get_stats()
        assert_pool_restored(engine)
    assert 0.1 < stats["spec_accept_rate"] < 0.9, stats  # both the accept test and the residual draw ran
    seqs = [tuple(o["output_ids"][:tokens]) for o in outs]
    counts = collections.Counter("rare" if seq in rare else seq for seq in seqs)
    chi2 = _chi2(counts, cells, n)
    assert chi2 < _chi2_critical(len(cells) - 1), (chi2, counts)
