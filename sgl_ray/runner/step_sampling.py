"""Sampling of one step's rows on the runner's device, and the row arithmetic shared with building its batch."""

from __future__ import annotations

import numpy as np
import torch

from sgl_ray.sampling.sampler import Sampler
from sgl_ray.sampling.state import SamplingState
from sgl_ray.scheduler.plan import StepPlan
from sgl_ray.speculative.worker import SpecWorker
from sgl_ray.transfer import to_device


def sample_step(
    plan: StepPlan,
    logits: torch.Tensor,
    input_logits: torch.Tensor,
    sampler: Sampler,
    state: SamplingState,
    last_tokens: torch.Tensor,
    spec: SpecWorker | None = None,
) -> dict[str, torch.Tensor]:
    """Sample the ``plan.sample`` rows of ``logits`` ([S, vocab]) and compute prompt logprobs from
    ``input_logits`` ([L, vocab]); returns device tensors named as ``StepOutput``'s fields. Updates ``state`` and
    each sampled slot's entry of ``last_tokens``. Host-side request slots keep the sampler free of device syncs.
    With ``spec``, each verify row samples counting the drafts before it as emitted, the drafts are accepted or
    rejected (``speculative.verify``), each request's token is its last emitted one, and ``state`` records every
    token a verify entry emits."""
    device = last_tokens.device

    def h2d(array: np.ndarray) -> torch.Tensor:
        return to_device(array, device)

    out: dict[str, torch.Tensor] = {}
    if len(logits):
        counts = plan.sample_row_counts()
        row_req = np.repeat(np.arange(plan.batch_size), counts)  # [S] batch index of each sampled row
        slots_np = plan.req_pool_idxs[row_req]
        slots, slots_dev = _tensor(slots_np), h2d(slots_np)
        # Sequence position of each sampled token: one past its row ([S]).
        ends = plan.prefix_lens + plan.extend_lens
        positions = np.repeat(ends, counts) - rows_before_end(counts)
        top_n = plan.top_logprobs_num[row_req]
        k = int(top_n.max()) if len(top_n) else -1
        mask = h2d(plan.vocab_mask) if plan.vocab_mask is not None else None
        offsets = spec.sampling_offsets(plan, state) if spec is not None else None
        res = sampler.sample(
            logits,
            slots,
            h2d(positions),
            state,
            top_logprobs_num=max(k, 0),
            return_logprobs=k >= 0,
            vocab_mask=mask,
            slots_dev=slots_dev,
            offsets=offsets,
        )
        row_tokens, row_logprobs = res.next_token_ids, res.logprobs
        verified = spec.verify(plan, logits, row_tokens, row_logprobs, state) if spec is not None else None
        if verified is not None:  # verify rows now hold the tokens they emit; the state counts each of them
            row_tokens, row_logprobs = verified.tokens, verified.logprobs
            state.update(slots_dev, row_tokens, _emitted_rows(plan, verified.emitted))
        tokens = row_tokens
        if len(row_req) != plan.sample.sum():  # verification rows: a request's token is its last emitted one
            has = counts > 0
            last = h2d(np.cumsum(counts)[has] - 1)
            if verified is not None:
                last = last - (h2d(counts[has]) - verified.emitted[h2d(np.flatnonzero(has))])
            slots_dev, tokens = slots_dev[last], tokens[last]
        if verified is None:
            state.update(slots_dev, tokens)
        last_tokens[slots_dev] = tokens
        out["next_token_ids"] = row_tokens
        if verified is not None:
            out["spec_emitted"] = verified.emitted
        if k >= 0:
            out["logprobs"] = row_logprobs
            if k > 0:
                out["top_ids"], out["top_vals"] = res.top_logprob_ids, res.top_logprob_vals
    if len(input_logits):
        logp = torch.log_softmax(input_logits, dim=-1)  # [L, vocab]
        targets = h2d(plan.input_logprob_targets)
        out["input_logprobs"] = logp.gather(1, targets[:, None]).squeeze(1)
        want = plan.input_logprob_start >= 0
        k = int(plan.top_logprobs_num[want].max())
        if k > 0:
            out["input_top_vals"], out["input_top_ids"] = logp.topk(k, dim=-1)
    return out


def _emitted_rows(plan: StepPlan, emitted: torch.Tensor) -> torch.Tensor:
    """[S] bool on ``emitted``'s device: the sampled rows whose tokens are emitted — a verify entry's first
    ``emitted[b]`` rows (``emitted`` [B]), the last row of any other entry."""
    dev = emitted.device
    counts = plan.sample_row_counts()
    before_end = rows_before_end(counts)
    col = np.repeat(counts, counts) - 1 - before_end  # [S] each row's index in its entry's rows
    row_req = np.repeat(np.arange(plan.batch_size), counts)
    in_verify = np.repeat(plan.draft_lens > 0, counts)
    first = to_device(col, dev) < emitted[to_device(row_req, dev)]
    return torch.where(to_device(in_verify, dev), first, to_device(before_end == 0, dev))


def rows_before_end(counts: np.ndarray) -> np.ndarray:
    """``concat(arange(c)[::-1] for c in counts)``: how far each sampled row is from its request's last row."""
    counts = counts.astype(np.int64)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(counts, counts) - 1 - within


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array`` (copied when read-only, as arrays deserialised by Ray are)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())
