"""Logit processors applied before greedy / random selection: logit bias, min-new-tokens mask, penalties.

Order (each step sees the previous one's output): logit_bias -> min_new_tokens mask -> repetition penalty ->
frequency / presence penalties. Semantics follow HF (repetition) and OpenAI / vLLM (frequency, presence):

  * repetition ``r``, over tokens seen in the prompt or the output: ``l > 0 ? l / r : l * r``;
  * frequency ``f`` and presence ``p``, over output tokens only: ``l - f * count - p * (count > 0)``.

Every function works on a whole batch at once; rows whose request does not use a processor carry neutral
coefficients, so no per-row branching is needed. A row may count tokens beyond its slot's state (the drafts before
a speculative verify row: :mod:`~sgl_ray.sampling.offsets`): they are added to its gathered output counts and to
its number of generated tokens.
"""

from __future__ import annotations

import torch

from sgl_ray.sampling.offsets import RowOffsets
from sgl_ray.sampling.state import BatchPlan, SamplingState


def apply_logit_bias(logits: torch.Tensor, bias_ids: torch.Tensor, bias_vals: torch.Tensor) -> None:
    """In place: ``logits[i, bias_ids[i, j]] += bias_vals[i, j]``. logits [B, V]; ids / vals [B, Kb], pads add 0."""
    logits.scatter_add_(1, bias_ids, bias_vals)


def apply_min_new_tokens(
    logits: torch.Tensor, stop_ids: torch.Tensor, stop_valid: torch.Tensor, active: torch.Tensor
) -> None:
    """In place: set stop tokens to -inf on rows still below their minimum length.

    logits [B, V]; stop_ids / stop_valid [B, Ks]; active [B] bool (``num_generated < min_new_tokens``).
    """
    mask = stop_valid & active.unsqueeze(1)  # [B, Ks]
    neg = torch.zeros(mask.shape, dtype=logits.dtype, device=logits.device).masked_fill_(mask, float("-inf"))
    logits.scatter_add_(1, stop_ids, neg)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF repetition penalty. logits [B, V]; seen [B, V] bool; penalty [B] (1 = off). Returns [B, V]."""
    p = penalty.unsqueeze(1)  # [B, 1]
    scaled = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, scaled, logits)


def apply_frequency_presence(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI penalties. logits [B, V]; counts [B, V] int output counts; frequency / presence [B]. Returns [B, V]."""
    c = counts.to(logits.dtype)
    penalty = c * frequency.unsqueeze(1) + (c > 0).to(logits.dtype) * presence.unsqueeze(1)
    return logits - penalty


def process_logits(
    logits: torch.Tensor,
    state: SamplingState,
    slots: torch.Tensor,
    plan: BatchPlan,
    offsets: RowOffsets | None = None,
) -> torch.Tensor:
    """Run every processor the batch needs; may modify ``logits`` [B, V] (float32) in place and returns the result.

    ``slots`` [B] int64 on the state's device (may repeat: rows of one request); ``offsets``: tokens rows count as
    emitted beyond their slot's state.
    """
    if plan.logit_bias:
        apply_logit_bias(logits, state.bias_ids[slots], state.bias_vals[slots])
    if plan.min_new_tokens:
        generated = state.num_generated[slots]  # [B]
        if offsets is not None:
            generated = generated + offsets.generated
        active = generated < state.min_new_tokens[slots]
        apply_min_new_tokens(logits, state.stop_ids[slots], state.stop_valid[slots], active)
    if plan.needs_penalties:
        assert state.output_counts is not None and state.prompt_mask is not None, (
            "penalty buffers not allocated"
        )
        counts = state.output_counts[slots]  # [B, V] int32, a gathered copy
        if offsets is not None:
            counts.index_put_((offsets.rows, offsets.tokens), offsets.weights, accumulate=True)
        if plan.repetition:
            seen = state.prompt_mask[slots] | (counts > 0)  # [B, V]
            logits = apply_repetition_penalty(logits, seen, state.repetition_penalty[slots])
        if plan.frequency_presence:
            logits = apply_frequency_presence(
                logits, counts, state.frequency_penalty[slots], state.presence_penalty[slots]
            )
    return logits
