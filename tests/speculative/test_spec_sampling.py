"""Speculative sampling keeps the target's distribution: rejection sampling with a draft model's chains, and the
walk over tree drafts (``speculative_eagle_topk`` > 1).

A tiny model over 512 tokens, sampled at temperature 2 with top-k 3: the first three tokens after a fixed prompt
take one of 27 values whose probabilities are enumerated exactly from transformers (the distribution without
speculation). The engine samples them many times, each request with its own seed, with a perturbed copy of the
model as the draft (it proposes 2 drafts after the first token, and agrees with the target only part of the
time, so both the accept test and the residual draw are exercised). A chi-square test at p = 1e-6 compares the
counts with the exact distribution: it cannot flake in practice, and it catches a broken rule (accepting every
draft, say, would give the draft's distribution, far from the target's here).

Tree drafts are checked the same way (topk 2 and 3, trees of 4 and 6 nodes over 2 and 3 depths, top-k alone and
with top-p), and a seeded tree output must also be the token-for-token output of decoding without speculation.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import sgl_ray

PROMPT = [11, 22, 33, 44, 55, 66]
TEMPERATURE, TOP_K, N = 2.0, 3, 1200


def _exact(
    path: str, tokens: int, temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = 1.0
) -> dict[tuple[int, ...], float]:
    """P(first ``tokens`` tokens) under temperature, top-k and top-p (the shortest prefix of the sorted
    distribution whose mass reaches ``top_p``), enumerated."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def next_dist(ids: list[int]) -> list[tuple[int, float]]:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1] / temperature
        probs, idx = torch.softmax(logits, -1).sort(descending=True)
        before = probs.cumsum(0) - probs  # mass of the tokens above each
        assert (before[:top_k] - top_p).abs().min() > 1e-3, "top-p too close to a boundary for an exact count"
        keep = min(top_k, int((before < top_p).sum()))
        kept = probs[:keep] / probs[:keep].sum()
        return list(zip(idx[:keep].tolist(), kept.tolist(), strict=True))

    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(tokens):
        out = {seq + (t,): p * q for seq, p in out.items() for t, q in next_dist(PROMPT + list(seq))}
    return out


def _chi2_critical(df: int, z: float = 4.753) -> float:
    """The chi-square quantile at the normal quantile ``z`` (Wilson-Hilferty; z = 4.753: p = 1e-6)."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: collections.Counter, exact: dict[tuple[int, ...], float], n: int) -> float:
    assert set(counts) <= set(exact), "a sequence the target cannot sample (outside the top-k / top-p)"
    return sum((counts.get(seq, 0) - n * p) ** 2 / (n * p) for seq, p in exact.items())


@pytest.mark.parametrize("tokens", [3])
def test_draft_model_sampling_follows_the_target(small_vocab_pair, tokens):
    target, draft = small_vocab_pair
    exact = _exact(target, tokens)
    assert min(exact.values()) * N > 5  # every cell is expected often enough for the chi-square test
    params = [
        {"temperature": TEMPERATURE, "top_k": TOP_K, "max_new_tokens": 4, "ignore_eos": True, "seed": s}
        for s in range(N)
    ]
    spec = dict(
        speculative_algorithm="STANDALONE", speculative_draft_model_path=draft, speculative_num_steps=2
    )
    with sgl_ray.Engine(target, max_total_tokens=8192, skip_tokenizer_init=True, **spec) as engine:
        outs = engine.generate(input_ids=[PROMPT] * N, sampling_params=params)
        stats = engine.get_stats()
        again = engine.generate(input_ids=PROMPT, sampling_params=params[17])  # seeded: reproducible
        assert again["output_ids"] == outs[17]["output_ids"]
    assert 0.1 < stats["spec_accept_rate"] < 0.9, stats  # both the accept test and the residual draw ran
    counts = collections.Counter(tuple(o["output_ids"][:tokens]) for o in outs)
    chi2 = _chi2(counts, exact, N)
    assert chi2 < _chi2_critical(len(exact) - 1), (chi2, counts)


@pytest.mark.parametrize(
    ("topk", "steps", "nodes", "temperature", "top_k", "top_p"),
    [(2, 2, 4, TEMPERATURE, TOP_K, 1.0), (3, 3, 6, 0.7, 4, 0.6)],
)
def test_tree_sampling_follows_the_target(small_vocab_pair, topk, steps, nodes, temperature, top_k, top_p):
    """Tree drafts of the perturbed draft model: the first three sampled tokens follow the target's enumerated
    distribution; seeded requests give the tokens of decoding without speculation."""
    target, draft = small_vocab_pair
    tokens = 3
    exact = _exact(target, tokens, temperature, top_k, top_p)
    assert min(exact.values()) * N > 5
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": 4}
    params = [{**sampling, "ignore_eos": True, "seed": s} for s in range(N)]
    spec = dict(
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=draft,
        speculative_eagle_topk=topk,
        speculative_num_steps=steps,
        speculative_num_draft_tokens=nodes + 1,
    )
    with sgl_ray.Engine(target, max_total_tokens=8192, skip_tokenizer_init=True, **spec) as engine:
        outs = engine.generate(input_ids=[PROMPT] * N, sampling_params=params)
        stats = engine.get_stats()
    assert (
        stats["spec_verify_steps"] > 0 and 0 < stats["spec_accepted_drafts"] < stats["spec_proposed_drafts"]
    )
    counts = collections.Counter(tuple(o["output_ids"][:tokens]) for o in outs)
    chi2 = _chi2(counts, exact, N)
    assert chi2 < _chi2_critical(len(exact) - 1), (chi2, counts)
    with sgl_ray.Engine(target, max_total_tokens=2048, skip_tokenizer_init=True) as plain:
        want = plain.generate(input_ids=[PROMPT] * 40, sampling_params=params[:40])
    assert [o["output_ids"] for o in outs[:40]] == [o["output_ids"] for o in want]
