"""Sampler and counter-based noise: greedy rows, logprobs, seeds, noise quality and the top-k/top-p/min-p filters
(CPU, deterministic: every seed is fixed; one GPU-marked test compares CUDA with the CPU)."""

from __future__ import annotations

import pytest
import torch

from sgl_ray.sampling import noise
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.sampling.sampler import Sampler
from sgl_ray.sampling.state import SamplingState

from .sampling_helpers import EOS, LOGITS, PROBS, draw_many, make_state

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


def test_sampling_params_aliases_and_unknown_keys():
    """OpenAI/vLLM's ``max_tokens``/``min_tokens`` name the engine's fields; any other unknown key is an error
    naming it, from a dict (Python, Ray Data rows) as from JSON (``/generate``)."""
    import msgspec

    from sgl_ray.entrypoints.requests import to_sampling_params
    from sgl_ray.errors import InvalidRequestError

    p = to_sampling_params({"max_tokens": 7, "min_tokens": 2, "temperature": 0}).normalized()
    assert (p.max_new_tokens, p.min_new_tokens, p.max_tokens, p.min_tokens) == (7, 2, None, None)
    assert to_sampling_params({"max_tokens": 7, "max_new_tokens": 7}).normalized().max_new_tokens == 7
    with pytest.raises(InvalidRequestError, match="max_tokenz"):
        to_sampling_params({"max_tokenz": 7})
    with pytest.raises(InvalidRequestError, match="max_tokens") as e:
        to_sampling_params({"max_tokens": 7, "max_new_tokens": 9}).normalized()
    assert e.value.param == "max_tokens"
    with pytest.raises(msgspec.ValidationError, match="best_of"):
        msgspec.json.decode(b'{"best_of": 2}', type=SamplingParams)
    assert SamplingParams(max_tokens=3).normalized().max_new_tokens == 3
