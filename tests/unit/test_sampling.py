"""Sampler, sampling state, logit processors and counter-based noise (CPU, deterministic: every seed is fixed)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from sgl_ray.errors import InvalidRequestError
from sgl_ray.sampling import noise
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.sampling.penalties import process_logits
from sgl_ray.sampling.sampler import Sampler
from sgl_ray.sampling.state import SamplingState

EOS = 2
# A small distribution with well separated cumulative masses: 0.40, 0.65, 0.80, 0.90, 0.96, 1.00.
PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
LOGITS = PROBS.log()


def make_state(params: list[SamplingParams], vocab: int, seeds: list[int] | None = None) -> SamplingState:
    """A state with request i in slot i."""
    st = SamplingState(max_reqs=len(params) + 2, vocab_size=vocab)
    for i, p in enumerate(params):
        st.set_request(i, p, seed=seeds[i] if seeds else i, eos_token_ids=[EOS], prompt_ids=[0, 1])
    return st


def draw_many(
    params: SamplingParams, logits: torch.Tensor, n: int, truncate: bool | None = None
) -> torch.Tensor:
    """``n`` draws from ``logits`` [V] in one batch: 64 requests (seeds 0..63) at n/64 positions each. [n] ids."""
    reqs = 64
    st = make_state([params] * reqs, logits.shape[-1])
    rows = torch.arange(n)
    return Sampler(truncate).sample(logits.expand(n, -1), rows % reqs, rows // reqs, st).next_token_ids


# ---- greedy, logprobs ---------------------------------------------------------------------------------------------


def test_greedy_is_argmax_even_beside_sampled_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.5)] * 3
    st = make_state(params, 50)
    out = Sampler().sample(logits, torch.arange(6), torch.arange(6), st)
    assert torch.equal(out.next_token_ids[::2], logits[::2].argmax(-1))
    all_greedy = make_state([SamplingParams(temperature=0.0)] * 6, 50)
    assert st.plan(torch.arange(6)).all_greedy is False
    assert all_greedy.plan(torch.arange(6)).all_greedy is True
    out = Sampler().sample(logits, torch.arange(6), torch.arange(6), all_greedy)
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


def test_top_k_one_is_greedy() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.9, 0.5]])
    st = make_state([SamplingParams(temperature=2.0, top_k=1)], 4)
    for pos in range(20):
        out = Sampler().sample(logits, torch.tensor([0]), torch.tensor([pos]), st)
        assert out.next_token_ids.tolist() == [1]


def test_logprobs_are_raw_log_softmax_and_top_logprobs_are_true_top_k() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 30) * 2
    params = [
        SamplingParams(temperature=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, logit_bias={3: 5.0}),
        SamplingParams(temperature=1.0, top_k=4),
        SamplingParams(temperature=0.9, frequency_penalty=1.0),
    ]
    st = make_state(params, 30)
    before = logits.clone()
    out = Sampler().sample(
        logits, torch.arange(4), torch.arange(4), st, top_logprobs_num=torch.tensor([0, 3, 1, 0])
    )
    assert torch.equal(logits, before), "the caller's logits must not be modified"
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.next_token_ids[:, None]).squeeze(1))
    assert out.top_logprob_ids is not None and out.top_logprob_vals is not None
    assert out.top_logprob_ids.shape == (4, 3)
    vals, ids = ref.topk(3, dim=-1)
    assert torch.equal(out.top_logprob_ids, ids)
    torch.testing.assert_close(out.top_logprob_vals, vals)
    none = Sampler().sample(logits, torch.arange(4), torch.arange(4), st, top_logprobs_num=0)
    assert none.top_logprob_ids is None and none.top_logprob_vals is None


def test_half_precision_logits() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]], dtype=torch.bfloat16)
    st = make_state([SamplingParams(temperature=0.0)], 4)
    out = Sampler().sample(logits, torch.tensor([0]), torch.tensor([0]), st)
    assert out.next_token_ids.tolist() == [1]
    assert out.logprobs.dtype == torch.float32


# ---- seeds and reproducibility ------------------------------------------------------------------------------------


@pytest.mark.parametrize("truncate", [True, False])
def test_same_seed_and_position_gives_same_token_whatever_the_batch(truncate: bool) -> None:
    torch.manual_seed(2)
    v = 500
    kinds = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=40),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.7, top_k=100, top_p=0.95, min_p=0.01),
    ]
    n = 12
    logits = torch.randn(n, v) * 2
    st = make_state([kinds[i % len(kinds)] for i in range(n)], v, seeds=[1000 + i for i in range(n)])
    positions = torch.arange(n) * 3 + 5
    full = Sampler(truncate).sample(logits, torch.arange(n), positions, st).next_token_ids
    for rows in (torch.randperm(n), torch.tensor([3, 0, 7]), torch.tensor([11]), torch.arange(1, n, 2)):
        part = Sampler(truncate).sample(logits[rows], rows, positions[rows], st).next_token_ids
        assert torch.equal(part, full[rows])
    other = Sampler(not truncate).sample(logits, torch.arange(n), positions, st).next_token_ids
    assert torch.equal(other, full), "truncated and full-sort paths must pick the same tokens"


def test_seed_survives_a_change_of_slot() -> None:
    logits = torch.randn(1, 300)
    p = SamplingParams(temperature=1.0, top_p=0.95)
    st = SamplingState(max_reqs=8, vocab_size=300)
    st.set_request(1, p, seed=99, eos_token_ids=[EOS], prompt_ids=[0])
    st.set_request(6, p, seed=99, eos_token_ids=[EOS], prompt_ids=[0])
    for pos in range(10):
        a = Sampler().sample(logits, torch.tensor([1]), torch.tensor([pos]), st).next_token_ids
        b = Sampler().sample(logits, torch.tensor([6]), torch.tensor([pos]), st).next_token_ids
        assert torch.equal(a, b)


def test_different_seeds_and_positions_differ() -> None:
    v, n = 1000, 200
    logits = torch.zeros(n, v)  # uniform: every difference comes from the noise
    st = make_state([SamplingParams(temperature=1.0)] * n, v, seeds=list(range(n)))
    a = Sampler().sample(logits, torch.arange(n), torch.zeros(n, dtype=torch.long), st).next_token_ids
    assert len(set(a.tolist())) > 0.8 * n, "distinct seeds at one position must give (mostly) distinct tokens"
    b = Sampler().sample(logits, torch.arange(n), torch.ones(n, dtype=torch.long), st).next_token_ids
    assert (a != b).float().mean() > 0.95, "the next position must draw fresh noise"
    c = Sampler().sample(logits, torch.arange(n), torch.zeros(n, dtype=torch.long), st).next_token_ids
    assert torch.equal(a, c)


def test_unit_mapping_never_reaches_zero_or_one() -> None:
    bits = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 512, 2**32 - 1])
    u = noise.to_unit(bits.clone())
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert torch.isfinite(u.log().neg().log()).all()
    assert float(u[-1]) == 1.0 - 2.0**-24 and float(u[0]) == 2.0**-24


def test_large_seeds_use_all_63_bits() -> None:
    lo, hi = 12345, 12345 + (1 << 40)
    keys = noise.seed_keys(torch.tensor([lo, hi, (1 << 63) - 1]))
    assert len(set(keys.tolist())) == 3
    assert all(0 <= k < 2**32 for k in keys.tolist())
    st = make_state([SamplingParams()], 5, seeds=[(1 << 63) - 1])
    assert int(st.seed_key[0]) == int(keys[2])


# ---- noise quality ------------------------------------------------------------------------------------------------


def test_noise_is_uniform_and_uncorrelated() -> None:
    seeds = torch.arange(16).repeat_interleave(64)  # [1024]
    positions = torch.arange(64).repeat(16)  # [1024]
    u = noise.uniform(
        noise.row_keys(noise.seed_keys(seeds), positions), noise.token_keys(torch.arange(1024))
    )  # [1024, 1024]
    assert u.min() > 0.0 and u.max() < 1.0
    bins = 256
    counts = torch.bincount((u * bins).long().flatten(), minlength=bins).double()
    expected = u.numel() / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 400, f"chi-square {chi2:.1f} over {bins - 1} degrees of freedom"  # mean 255, sd 22.6
    centred = u.double() - 0.5

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).mean() / (a.std() * b.std()))

    # Neighbouring tokens, neighbouring positions (same seed), neighbouring seeds (same position): sd ~ 0.001.
    assert abs(corr(centred[:, :-1], centred[:, 1:])) < 0.01
    assert abs(corr(centred[:-1], centred[1:])) < 0.01
    assert abs(corr(centred[:-64], centred[64:])) < 0.01
    assert abs(float(u.double().mean()) - 0.5) < 0.002


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    n = 20000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    ids = draw_many(SamplingParams(temperature=temperature), logits, n)
    freq = torch.bincount(ids, minlength=6).double() / n
    target = torch.softmax(logits.double() / temperature, dim=-1)
    assert float((freq - target).abs().max()) < 0.015  # 1 sd <= 0.0035


def test_empirical_distribution_over_positions_with_one_seed() -> None:
    n = 20000
    st = make_state([SamplingParams(temperature=1.0)], 6, seeds=[42])
    slots = torch.zeros(n, dtype=torch.long)  # one request, read at n positions
    ids = Sampler().sample(LOGITS.expand(n, -1), slots, torch.arange(n), st).next_token_ids
    freq = torch.bincount(ids, minlength=6).double() / n
    assert float((freq - PROBS.double()).abs().max()) < 0.015


# ---- filters ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_p=0.6), {0, 1}),  # masses before each token: 0, .40, .65 -> stop at the 3rd
        (SamplingParams(top_p=0.7), {0, 1, 2}),
        (SamplingParams(top_p=0.05), {0}),
        (SamplingParams(min_p=0.3), {0, 1, 2}),  # keep p >= 0.12
        (SamplingParams(min_p=0.5), {0, 1}),  # keep p >= 0.20
        (SamplingParams(top_k=4, top_p=0.75, min_p=0.2), {0, 1, 2}),
        (SamplingParams(top_k=2, top_p=0.95), {0, 1}),
        (SamplingParams(temperature=0.5, top_p=0.7), {0, 1}),  # p ~ p**2: .52, .20, .07 -> mass .52, .72
        (SamplingParams(), {0, 1, 2, 3, 4, 5}),
    ],
)
def test_filters_keep_exactly_the_allowed_tokens(
    params: SamplingParams, allowed: set[int], truncate: bool
) -> None:
    ids = draw_many(params, LOGITS, 3000, truncate)
    assert set(ids.tolist()) == allowed


def test_filtered_distribution_is_renormalised() -> None:
    n = 20000
    ids = draw_many(SamplingParams(top_k=3), LOGITS, n)
    freq = torch.bincount(ids, minlength=6).double() / n
    target = torch.zeros(6, dtype=torch.float64)
    target[:3] = PROBS[:3].double() / PROBS[:3].sum()
    assert float((freq - target).abs().max()) < 0.015


def test_ties_at_the_cutoff_are_all_kept() -> None:
    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0])
    for truncate in (True, False):
        assert set(draw_many(SamplingParams(top_k=2), logits, 2000, truncate).tolist()) == {0, 1, 2, 3}


def test_truncation_grows_past_its_first_guess() -> None:
    v = 4096
    logits = torch.zeros(v)
    logits[:1000] = 5.0  # top_p=0.9 needs ~900 tokens, more than the first topk holds
    a = draw_many(SamplingParams(top_p=0.9), logits, 64, truncate=True)
    b = draw_many(SamplingParams(top_p=0.9), logits, 64, truncate=False)
    assert torch.equal(a, b)
    assert int(a.max()) < 1000


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


def test_gumbel_max_draws_from_softmax() -> None:
    n = 50000
    keys = noise.row_keys(noise.seed_keys(torch.arange(n)), torch.zeros(n, dtype=torch.long))
    scores = LOGITS[None] - noise.log_exponential(keys, noise.token_keys(torch.arange(6)))  # [n, 6]
    freq = torch.bincount(scores.argmax(-1), minlength=6).double() / n
    assert float((freq - PROBS.double()).abs().max()) < 0.01  # 1 sd <= 0.0022


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    torch.manual_seed(3)
    v, n = 2000, 24
    kinds = [
        SamplingParams(temperature=0.9, top_p=0.9, frequency_penalty=0.4),
        SamplingParams(temperature=0.0, logit_bias={5: 3.0}),
        SamplingParams(temperature=1.1, top_k=30, min_new_tokens=4, repetition_penalty=1.2),
        SamplingParams(temperature=0.7, min_p=0.02),
    ]
    logits = torch.randn(n, v) * 2
    out = {}
    for device in ("cpu", "cuda"):
        st = SamplingState(max_reqs=n, vocab_size=v, device=device)
        for i in range(n):
            st.set_request(
                i, kinds[i % 4], seed=i, eos_token_ids=[EOS], prompt_ids=[0, 1, 9], output_ids=[3, 3]
            )
        slots, positions = torch.arange(n), torch.arange(n) + 11
        res = Sampler().sample(logits.to(device), slots, positions, st, top_logprobs_num=2)
        st.update(slots.to(device), res.next_token_ids)
        out[device] = (res, st.output_counts, st.num_generated)
    cpu, cuda = out["cpu"], out["cuda"]
    assert torch.equal(cpu[0].next_token_ids, cuda[0].next_token_ids.cpu())
    torch.testing.assert_close(cpu[0].logprobs, cuda[0].logprobs.cpu())
    assert torch.equal(cpu[1], cuda[1].cpu()) and torch.equal(cpu[2], cuda[2].cpu())
