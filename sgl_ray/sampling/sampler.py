"""Batched sampling: every row of a batch in one pass of tensor ops, parameters gathered by request slot."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sgl_ray.sampling import noise
from sgl_ray.sampling.bitmask import apply_token_bitmask_
from sgl_ray.sampling.filters import select_candidates
from sgl_ray.sampling.offsets import RowOffsets
from sgl_ray.sampling.penalties import process_logits
from sgl_ray.sampling.state import BatchPlan, SamplingState
from sgl_ray.transfer import to_device


class SampleOutput(NamedTuple):
    """One sampled token per row, with log-probs under the raw model distribution (before any processing)."""

    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32: log_softmax(logits)[i, next_token_ids[i]]; None if not asked
    top_logprob_ids: torch.Tensor | None  # [B, k] int64, k = max requested in the batch; None when k == 0
    top_logprob_vals: torch.Tensor | None  # [B, k] float32, descending


class Sampler:
    """Samples the next token of B requests from their logits.

    Algorithm (per row, all rows at once):
      0. a grammar's token bitmask, when given, sets disallowed logits to -inf;
      1. logit processors (bias, min-new-tokens mask, penalties; see :mod:`penalties`) — only those some row of
         the batch uses;
      2. greedy rows (temperature 0 or top-k 1) take the argmax of the processed logits;
      3. other rows: ``z = logits / T``; top-k, top-p and min-p give a keep-cutoff ``c`` (see :mod:`filters`),
         and the token is ``argmax_{z_v >= c} (z_v + G(seed, position, v))`` — the Gumbel-max trick, a draw from
         softmax(z) renormalised over the kept set. ``G`` is a hash of its arguments (see :mod:`noise`), so a
         seeded request gets the same token at the same position whatever else shares its batch.

    ``truncate_candidates`` (default: on for CPU) reads kept-set sizes back to the host to use ``topk`` instead
    of a full sort and to draw noise for the kept candidates only; the tokens are identical either way.

    Example::

        >>> from sgl_ray.sampling.params import SamplingParams
        >>> st = SamplingState(max_reqs=2, vocab_size=5)
        >>> st.set_request(0, SamplingParams(temperature=0.0), seed=0, eos_token_ids=[], prompt_ids=[1])
        >>> out = Sampler().sample(torch.tensor([[0.0, 3.0, 1.0, 0.0, 0.0]]), torch.tensor([0]),
        ...                        torch.tensor([1]), st)
        >>> out.next_token_ids.tolist()
        [1]
    """

    def __init__(self, truncate_candidates: bool | None = None) -> None:
        self.truncate_candidates = truncate_candidates
        self._vocab_keys: dict[tuple[int, torch.device], torch.Tensor] = {}

    def sample(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        state: SamplingState,
        top_logprobs_num: torch.Tensor | int | None = None,
        return_logprobs: bool = True,
        vocab_mask: torch.Tensor | None = None,
        slots_dev: torch.Tensor | None = None,
        offsets: RowOffsets | None = None,
    ) -> SampleOutput:
        """Sample one token per row (``return_logprobs=False`` skips the log-softmax work: ``logprobs`` is None).

        logits [B, V] (any float dtype; V == state.vocab_size); slots [B] int64 request slots (pass them on the
        host to plan without a device sync; a request's verify rows repeat its slot); positions [B] int64, the
        sequence position of the token being sampled; top_logprobs_num [B] ints or one int (its max over the batch
        is read on the host); vocab_mask [B, ceil(V/32)] int32 packed allowed tokens (structured outputs), applied
        before every other step; slots_dev: ``slots`` already on the device, where the caller has them; offsets:
        tokens rows count as already emitted (speculative verify rows, :mod:`~sgl_ray.sampling.offsets`). The
        caller's ``logits`` are never modified.
        """
        if logits.shape[-1] != state.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} columns, the sampling state {state.vocab_size}")
        plan = state.plan(slots)
        raw = logits.float()  # [B, V]; may alias the caller's tensor
        dev = raw.device
        if slots_dev is None:
            slots_dev = to_device(slots, dev)
        slots_dev = slots_dev.to(torch.int64)
        lse = torch.logsumexp(raw, dim=-1) if return_logprobs else None  # [B]

        if plan.all_greedy and not plan.needs_processing and vocab_mask is None:
            next_ids = raw.argmax(dim=-1)
        else:
            x = raw
            if vocab_mask is not None:
                x = apply_token_bitmask_(raw.clone(), vocab_mask)
            if plan.needs_processing:
                x = process_logits(x.clone() if x is raw else x, state, slots_dev, plan, offsets)
            if plan.all_greedy:
                next_ids = x.argmax(dim=-1)
            else:
                next_ids = self._sample_random(
                    x, state, slots_dev, positions.to(dev, torch.int64, non_blocking=True), plan
                )
                if plan.any_greedy:
                    next_ids = torch.where(state.greedy[slots_dev], x.argmax(dim=-1), next_ids)

        if lse is None:
            return SampleOutput(next_ids, None, None, None)
        logprobs = raw.gather(1, next_ids.unsqueeze(1)).squeeze(1) - lse
        k = _max_k(top_logprobs_num)
        if k <= 0:
            return SampleOutput(next_ids, logprobs, None, None)
        top_vals, top_ids = raw.topk(min(k, raw.shape[-1]), dim=-1)
        return SampleOutput(next_ids, logprobs, top_ids, top_vals - lse.unsqueeze(1))

    def _sample_random(
        self,
        x: torch.Tensor,
        state: SamplingState,
        slots: torch.Tensor,
        positions: torch.Tensor,
        plan: BatchPlan,
    ) -> torch.Tensor:
        """Gumbel-max draw for every row of ``x`` [B, V] (greedy rows get their argmax)."""
        temperature = state.temperature[slots]
        temperature = torch.where(state.greedy[slots], torch.ones_like(temperature), temperature)
        z = x / temperature.unsqueeze(1)  # [B, V]
        keys = noise.row_keys(state.seed_key[slots], positions)  # [B]
        if not (plan.top_k or plan.top_p or plan.min_p):
            z.sub_(noise.log_exponential(keys, self._vocab_token_keys(z.shape[-1], z.device)))
            return z.argmax(dim=-1)
        truncate = (
            self.truncate_candidates if self.truncate_candidates is not None else z.device.type == "cpu"
        )
        cand = select_candidates(z, state, slots, plan, truncate)
        if cand.values is not None and cand.ids is not None:
            scores = cand.values.masked_fill(cand.values < cand.cutoff, float("-inf"))  # [B, K]
            scores.sub_(noise.log_exponential(keys, noise.token_keys(cand.ids)))
            return cand.ids.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)
        z.masked_fill_(z < cand.cutoff, float("-inf"))
        z.sub_(noise.log_exponential(keys, self._vocab_token_keys(z.shape[-1], z.device)))
        return z.argmax(dim=-1)

    def _vocab_token_keys(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Cached ``noise.token_keys(arange(V))`` [V]."""
        key = (vocab_size, device)
        if key not in self._vocab_keys:
            ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
            self._vocab_keys[key] = noise.token_keys(ids)
        return self._vocab_keys[key]


def _max_k(top_logprobs_num: torch.Tensor | int | None) -> int:
    if top_logprobs_num is None:
        return 0
    if isinstance(top_logprobs_num, int):
        return top_logprobs_num
    return int(top_logprobs_num.max()) if top_logprobs_num.numel() else 0
