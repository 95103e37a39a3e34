"""The narrow types that cross the scheduler ↔ model-runner boundary.

A :class:`StepPlan` is all a runner (or a model-shard actor) gets per step; a :class:`StepOutput` is all it sends
back. The runner keeps per-request state only in "request slots" (``req_pool_idx``): the ``req_to_token`` row and
the sampling state, both written from the plan. Arrays are numpy so they serialise cheaply.
"""

from __future__ import annotations

import msgspec
import numpy as np

from sgl_ray.multimodal.inputs import MultimodalInputs
from sgl_ray.sampling.params import SamplingParams

_I64 = np.int64
FUTURE_TOKEN = -1
"""An ``input_ids`` entry of a decode row whose token the previous step of the same request slot samples (overlap
scheduling: the plan is built before that step's results are back). The runner reads it from its last sampled
token of the slot."""
DRAFT_TOKEN = -2
"""An ``input_ids`` entry of a verify row whose draft token the runner's draft model writes (STANDALONE)."""


def _empty(dtype: type = _I64) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


class NewRequest(msgspec.Struct, kw_only=True):
    """Binds a request to ``req_pool_idx`` (on admission, and again on resume after preemption)."""

    req_pool_idx: int
    sampling: SamplingParams
    seed: int
    eos_token_ids: list[int]
    prompt_ids: list[int]  # for the repetition penalty; empty when the request uses no penalties
    output_ids: list[int]  # tokens generated before a preemption (their counts feed the penalties)
    multimodal: MultimodalInputs | None = None  # the prompt's images and M-RoPE positions


class LoRALoad(msgspec.Struct, frozen=True):
    """Load the adapter at ``path`` into LoRA slot ``slot`` before running the step (replacing what is there)."""

    slot: int
    name: str
    path: str


class StepPlan(msgspec.Struct, kw_only=True):
    """One forward step over B requests and T new tokens (layout as in ``ForwardBatch``).

    ``table_*`` are extra ``req_to_token`` writes (cached-prefix slots of newly admitted requests, remaps after the
    prefix cache deduplicated KV); the new tokens' own slots come from ``out_cache_loc``. For request ``r``,
    ``input_logprob_start[r] >= 0`` asks for logprobs of the prompt tokens that follow rows
    ``start .. start + n_r`` of its chunk, against the next ``n_r`` entries of ``input_logprob_targets``.
    """

    step_id: int
    new_requests: list[NewRequest] = []
    freed_req_pool_idxs: list[int] = []
    table_req: np.ndarray = msgspec.field(default_factory=_empty)
    table_pos: np.ndarray = msgspec.field(default_factory=_empty)
    table_slot: np.ndarray = msgspec.field(default_factory=_empty)
    # Hybrid KV pools: full page swa_map_pages[i] now maps to the windowed layers' page swa_map_values[i] (0: none)
    swa_map_pages: np.ndarray = msgspec.field(default_factory=_empty)
    swa_map_values: np.ndarray = msgspec.field(default_factory=_empty)
    req_pool_idxs: np.ndarray = msgspec.field(default_factory=_empty)  # [B]
    prefix_lens: np.ndarray = msgspec.field(default_factory=_empty)  # [B]
    extend_lens: np.ndarray = msgspec.field(default_factory=_empty)  # [B]
    input_ids: np.ndarray = msgspec.field(default_factory=_empty)  # [T]
    out_cache_loc: np.ndarray = msgspec.field(default_factory=_empty)  # [T]
    sample: np.ndarray = msgspec.field(default_factory=lambda: _empty(np.bool_))  # [B]
    top_logprobs_num: np.ndarray = msgspec.field(default_factory=_empty)  # [B], -1: no logprobs
    input_logprob_start: np.ndarray = msgspec.field(default_factory=_empty)  # [B], -1: none
    input_logprob_counts: np.ndarray = msgspec.field(default_factory=_empty)  # [B]
    input_logprob_targets: np.ndarray = msgspec.field(default_factory=_empty)  # [sum counts]
    lora_loads: list[LoRALoad] = []
    lora_slots: np.ndarray = msgspec.field(default_factory=_empty)  # [B] adapter slot, -1: base model
    # Rows sampled at the end of each request's chunk (> 1 verifies jump-forward tokens); empty: ``sample``.
    sample_counts: np.ndarray = msgspec.field(default_factory=_empty)  # [B]
    # Allowed tokens of every sampled row (structured outputs); None when no request in the batch is constrained.
    vocab_mask: np.ndarray | None = None  # [S, ceil(vocab / 32)] int32, packed (see sampling.bitmask)
    mask_deferred: bool = (
        False  # the runner samples only once it is given vocab_mask (ModelRunner.sample_deferred)
    )
    # With ``mask_deferred`` and a runner-side drafter (STANDALONE, EAGLE): the masks depend on the drafts, so the
    # runner answers the launch with them (:class:`StepDrafts`) before it is given the masks.
    drafts_deferred: bool = False
    # Speculative decoding: drafts of each request (its chunk is [last token, drafts...], every row sampled and
    # verified on the runner: see sgl_ray.speculative.verify); empty when the plan verifies none.
    draft_lens: np.ndarray = msgspec.field(default_factory=_empty)  # [B]
    # NGRAM trees: each draft's parent row in its request's chunk (0: the request's token), drafts parents first;
    # empty for chains.
    draft_parents: np.ndarray = msgspec.field(default_factory=_empty)  # [sum draft_lens]

    # Overlap scheduling with speculation: entries planned while their request's previous step (``ahead_drafts``
    # drafts verified) was in flight. Their ``prefix_lens`` and ``out_cache_loc`` assume that step keeps every
    # draft; the runner moves each back by the drafts it rejected, reusing their KV slots (``ahead_slots``: the
    # slots of those drafts' positions, entry after entry). Empty when no entry is ahead of a verify step.
    ahead_drafts: np.ndarray = msgspec.field(default_factory=_empty)  # [B]
    ahead_slots: np.ndarray = msgspec.field(default_factory=_empty)  # [sum ahead_drafts]

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def decode_rows(self) -> np.ndarray | None:
        """[T] each token's position when every row of the plan is a decode of one token (every row sampled, no
        prompt logprobs): plain decode steps, and speculative verify steps of chains, whose row ``i`` attends to
        the request's positions up to its own, as a decode at that position does. None otherwise."""
        if (self.input_logprob_start >= 0).any() or len(self.draft_parents):
            return None
        ext = self.extend_lens
        if not (self.sample_row_counts() == ext).all():
            return None
        starts = np.cumsum(ext) - ext
        return np.repeat(self.prefix_lens - starts, ext) + np.arange(self.num_tokens)

    def sample_row_counts(self) -> np.ndarray:
        """[B] how many trailing rows of each request's chunk are sampled."""
        return self.sample_counts if len(self.sample_counts) else self.sample.astype(_I64)


class StepDrafts(msgspec.Struct, kw_only=True):
    """What a runner's drafter proposed for a step launched with ``drafts_deferred``, for the scheduler to build
    the verify rows' grammar masks from. One row per verify entry (``draft_lens > 0``), in batch order."""

    step_id: int
    tokens: (
        np.ndarray
    )  # [Bv, K] chain drafts d_1..d_k, or a tree's nodes (chunk rows 1..N); padding past each
    parents: np.ndarray | None = None  # [Bv, N] trees: the chunk row of each node's parent (0: the root x)


class StepOutput(msgspec.Struct, kw_only=True):
    """Results for the sampled rows of a step, in batch order (S = ``sample_row_counts().sum()``)."""

    step_id: int
    next_token_ids: np.ndarray  # [S]
    logprobs: np.ndarray | None = None  # [S] raw-distribution logprob of each sampled token
    top_ids: np.ndarray | None = None  # [S, k]
    top_vals: np.ndarray | None = None  # [S, k]
    input_logprobs: np.ndarray | None = None  # [sum input_logprob_counts]
    input_top_ids: np.ndarray | None = None  # [sum counts, k]
    input_top_vals: np.ndarray | None = None
    compute_s: float = 0.0  # time the runner spent on the step (for control-path overhead accounting)
    # With drafts: the tokens each request's rows emit (verify entries: kept drafts + 1, written over their first
    # rows of ``next_token_ids``; other entries: their sampled rows).
    spec_emitted: np.ndarray | None = None  # [B]
