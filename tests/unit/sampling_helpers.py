"""Shared values of the sampler tests: a small distribution with known masses, and states built for it."""

from __future__ import annotations

import torch

from sgl_ray.sampling.params import SamplingParams
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
