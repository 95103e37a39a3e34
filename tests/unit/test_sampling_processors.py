"""Logit processors in the sampling state: penalties, logit bias, min_new_tokens, their tables and slots, and the
checks on what a request may ask for (CPU, deterministic)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from sgl_ray.errors import InvalidRequestError
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.sampling.penalties import process_logits
from sgl_ray.sampling.sampler import Sampler
from sgl_ray.sampling.state import SamplingState

from .sampling_helpers import EOS, LOGITS, draw_many, make_state

# ---- logit processors ---------------------------------------------------------------------------------------------


def test_penalties_match_the_formulas() -> None:
    v = 8
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 3.0, 0.0, 1.5]] * 2)
    prompt, output = [1, 2], [3, 3, 4]
    rep, freq, pres = 1.5, 0.5, 0.3
    st = SamplingState(max_reqs=4, vocab_size=v)
    p = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    st.set_request(2, p, seed=0, eos_token_ids=[EOS], prompt_ids=prompt, output_ids=output)
    st.set_request(0, SamplingParams(), seed=0, eos_token_ids=[EOS], prompt_ids=[5])
    slots = torch.tensor([2, 0])
    got = process_logits(logits.clone(), st, slots, st.plan(slots))

    expected = logits[0].clone()
    counts = torch.bincount(torch.tensor(output), minlength=v).float()
    for t in set(prompt) | set(output):
        expected[t] = expected[t] / rep if expected[t] > 0 else expected[t] * rep
    expected -= freq * counts + pres * (counts > 0).float()
    torch.testing.assert_close(got[0], expected)
    torch.testing.assert_close(got[1], logits[1], msg="a request without penalties is untouched")


def test_update_feeds_the_penalties_and_resume_reproduces_the_counts() -> None:
    v = 16
    p = SamplingParams(temperature=0.0, frequency_penalty=0.7)
    st = SamplingState(max_reqs=4, vocab_size=v)
    assert st.output_counts is None, "penalty buffers are allocated lazily"
    st.set_request(1, SamplingParams(), seed=0, eos_token_ids=[EOS], prompt_ids=[0])
    assert st.output_counts is None
    st.set_request(3, p, seed=5, eos_token_ids=[EOS], prompt_ids=[4, 5])
    assert st.output_counts is not None and st.prompt_mask is not None
    generated = []
    logits = torch.linspace(0.0, 1.0, v)[None]  # greedy favours the last token until it is penalised
    for pos in range(6):
        out = Sampler().sample(logits, torch.tensor([3]), torch.tensor([2 + pos]), st)
        st.update(torch.tensor([3]), out.next_token_ids)
        generated.append(int(out.next_token_ids))
    assert len(set(generated)) > 1, "the frequency penalty must move greedy off its first choice"
    counts, gen = st.output_counts[3].clone(), int(st.num_generated[3])
    assert gen == 6
    assert torch.equal(counts, torch.bincount(torch.tensor(generated), minlength=v).int())

    resumed = SamplingState(max_reqs=4, vocab_size=v)
    resumed.set_request(0, p, seed=5, eos_token_ids=[EOS], prompt_ids=np.array([4, 5]), output_ids=generated)
    assert resumed.output_counts is not None and resumed.prompt_mask is not None
    assert torch.equal(resumed.output_counts[0], counts)
    assert int(resumed.num_generated[0]) == gen
    assert resumed.prompt_mask[0].nonzero().flatten().tolist() == [4, 5]


def test_logit_bias_forces_and_bans_tokens() -> None:
    force = draw_many(SamplingParams(logit_bias={5: 100.0}), LOGITS, 500)
    assert set(force.tolist()) == {5}
    ban = draw_many(SamplingParams(logit_bias={0: -100.0, 1: -100.0}), LOGITS, 3000)
    assert set(ban.tolist()) == {2, 3, 4, 5}
    greedy = make_state([SamplingParams(temperature=0.0, logit_bias={4: 2.0})], 6)  # log .06 + 2 > log .4
    out = Sampler().sample(LOGITS[None], torch.tensor([0]), torch.tensor([0]), greedy)
    assert out.next_token_ids.tolist() == [4]


def test_min_new_tokens_suppresses_eos_and_stop_ids_then_releases_them() -> None:
    v = 8
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 8.0, 1.0]])  # EOS (2), then stop id 6, then 7
    p = SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[6])
    st = SamplingState(max_reqs=2, vocab_size=v)
    st.set_request(0, p, seed=0, eos_token_ids=[EOS], prompt_ids=[1])
    slots = torch.tensor([0])
    tokens = []
    for pos in range(4):
        out = Sampler().sample(logits, slots, torch.tensor([1 + pos]), st)
        st.update(slots, out.next_token_ids)
        tokens.append(int(out.next_token_ids))
    assert tokens == [7, 7, 7, 2]
    # Resumed after two tokens: one more is still forced.
    st.set_request(1, p, seed=0, eos_token_ids=[EOS], prompt_ids=[1], output_ids=[7, 7])
    out = Sampler().sample(logits, torch.tensor([1]), torch.tensor([3]), st)
    assert out.next_token_ids.tolist() == [7]
    # ignore_eos: EOS is no stop token, so it is not masked; the stop id still is.
    free = msgspec.structs.replace(p, ignore_eos=True)
    st.set_request(1, free, seed=0, eos_token_ids=[EOS], prompt_ids=[1])
    assert Sampler().sample(logits, torch.tensor([1]), torch.tensor([1]), st).next_token_ids.tolist() == [2]


def test_many_stop_ids_and_biases_widen_their_tables() -> None:
    v = 64
    stops = list(range(10, 30))
    bias = {t: -100.0 for t in range(30, 50)}
    st = SamplingState(max_reqs=3, vocab_size=v)
    st.set_request(0, SamplingParams(temperature=0.0), seed=0, eos_token_ids=[EOS], prompt_ids=[1])
    p = SamplingParams(temperature=0.0, min_new_tokens=1, stop_token_ids=stops, logit_bias=bias)
    st.set_request(2, p, seed=0, eos_token_ids=[EOS], prompt_ids=[1])
    logits = torch.zeros(1, v)
    logits[0, 10:50] = 10.0
    logits[0, 60] = 5.0
    out = Sampler().sample(logits, torch.tensor([2]), torch.tensor([1]), st)
    assert out.next_token_ids.tolist() == [60]
    out = Sampler().sample(logits, torch.tensor([0]), torch.tensor([1]), st)
    assert out.next_token_ids.tolist() == [10], "slot 0 keeps its (empty) tables after widening"


def test_clear_request_returns_the_slot_to_neutral() -> None:
    st = make_state([SamplingParams(temperature=0.3, top_k=2, logit_bias={1: 5.0}, min_new_tokens=2)], 6)
    st.clear_request(0)
    plan = st.plan(np.array([0]))
    assert not (plan.top_k or plan.logit_bias or plan.min_new_tokens or plan.all_greedy)
    assert float(st.temperature[0]) == 1.0 and int(st.top_k[0]) == 6


def test_plan_skips_what_the_batch_does_not_use() -> None:
    st = make_state(
        [SamplingParams(temperature=0.0, top_p=0.5), SamplingParams(top_k=7), SamplingParams()], 50
    )
    greedy_only = st.plan(torch.tensor([0]))
    assert greedy_only.all_greedy and not greedy_only.needs_sort and not greedy_only.needs_processing
    mixed = st.plan(torch.tensor([0, 1]))
    assert mixed.top_k and not mixed.top_p and mixed.max_top_k == 7 and mixed.all_restricted
    assert not st.plan(torch.tensor([1, 2])).all_restricted


def test_out_of_vocabulary_ids_are_rejected_on_the_host() -> None:
    st = SamplingState(max_reqs=2, vocab_size=6)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        st.set_request(0, SamplingParams(logit_bias={6: 1.0}), seed=0, eos_token_ids=[EOS], prompt_ids=[1])
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        st.set_request(0, SamplingParams(stop_token_ids=[9]), seed=0, eos_token_ids=[EOS], prompt_ids=[1])


def test_mismatched_vocab_is_rejected() -> None:
    st = make_state([SamplingParams()], 6)
    with pytest.raises(ValueError, match="columns"):
        Sampler().sample(torch.zeros(1, 7), torch.tensor([0]), torch.tensor([0]), st)
