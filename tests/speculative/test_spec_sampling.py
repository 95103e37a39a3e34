"""Rejection sampling with a draft model keeps the target's distribution.

A tiny model over 512 tokens, sampled at temperature 2 with top-k 3: the first three tokens after a fixed prompt
take one of 27 values whose probabilities are enumerated exactly from transformers (the distribution without
speculation). The engine samples them many times, each request with its own seed, with a perturbed copy of the
model as the draft (it proposes 2 drafts after the first token, and agrees with the target only part of the
time, so both the accept test and the residual draw are exercised). A chi-square test at p = 1e-6 compares the
counts with the exact distribution: it cannot flake in practice, and it catches a broken rule (accepting every
draft, say, would give the draft's distribution, far from the target's here).
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


def _exact(path: str, tokens: int) -> dict[tuple[int, ...], float]:
    """P(first ``tokens`` tokens) under temperature and top-k, enumerated."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def next_dist(ids: list[int]) -> list[tuple[int, float]]:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1] / TEMPERATURE
        vals, idx = logits.topk(TOP_K)
        return list(zip(idx.tolist(), torch.softmax(vals, -1).tolist(), strict=True))

    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(tokens):
        out = {seq + (t,): p * q for seq, p in out.items() for t, q in next_dist(PROMPT + list(seq))}
    return out


def _chi2_critical(df: int, z: float = 4.753) -> float:
    """The chi-square quantile at the normal quantile ``z`` (Wilson-Hilferty; z = 4.753: p = 1e-6)."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


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
    assert set(counts) <= set(exact), "a token outside the top-k"
    chi2 = sum((counts.get(seq, 0) - N * p) ** 2 / (N * p) for seq, p in exact.items())
    assert chi2 < _chi2_critical(len(exact) - 1), (chi2, counts)
