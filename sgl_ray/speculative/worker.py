"""The runner side of speculative decoding: drafts before the target's forward pass, verification after sampling.

The :class:`~sgl_ray.runner.model_runner.ModelRunner` calls :meth:`SpecWorker.before_forward` once a plan's
bookkeeping is applied, runs the target over the returned input ids, samples every verify row (each counting the
drafts before it as emitted where its request's sampling reads them: :meth:`SpecWorker.sampling_offsets`), and
hands the sampled tokens to :meth:`SpecWorker.verify`. NGRAM plans carry their drafts in ``input_ids``; a draft
model (STANDALONE) or an EAGLE head writes them here. An EAGLE head also reads the target's hidden states of every
forward pass (:meth:`SpecWorker.after_forward`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from sgl_ray.errors import UnsupportedFeatureError
from sgl_ray.sampling.sampler import Sampler
from sgl_ray.scheduler.plan import StepDrafts, StepPlan
from sgl_ray.speculative.config import SpeculativeConfig
from sgl_ray.speculative.draft_model import DraftModel
from sgl_ray.speculative.eagle import EagleDraft
from sgl_ray.speculative.mtp import MtpDraft
from sgl_ray.speculative.tree import (
    TreeShape,
    ancestor_masks,
    move_path,
    pool_buffers,
    tree_mask,
    tree_positions,
)
from sgl_ray.speculative.verify import (
    Drafts,
    Verified,
    draft_paths,
    ngram_drafts_of,
    verify,
    verify_row_offsets,
    verify_tree,
)
from sgl_ray.transfer import to_device

if TYPE_CHECKING:
    from torch import nn

    from sgl_ray.configs.engine_args import EngineArgs
    from sgl_ray.configs.model_config import ModelConfig
    from sgl_ray.mem_cache.kv_pool import KVPool, ReqToTokenTable
    from sgl_ray.runner.forward_batch import ForwardBatch
    from sgl_ray.runner.memory import KVCapacity
    from sgl_ray.sampling.offsets import ChunkPaths, RowOffsets
    from sgl_ray.sampling.state import SamplingState


class SpecWorker:
    """Example::

    >>> worker = SpecWorker.create(args, model_config)  # None when speculation is off  # doctest: +SKIP
    >>> ids = worker.before_forward(plan, plan_ids)  # doctest: +SKIP
    >>> verified = worker.verify(plan, logits, tokens, logprobs, sampling_state)  # doctest: +SKIP
    """

    def __init__(self, config: SpeculativeConfig, draft: DraftModel | EagleDraft | None) -> None:
        self.config = config
        self.draft = draft
        self._drafts: Drafts | None = None  # the step in progress
        self._kv_pool: KVPool | None = None  # the target's (moves an accepted tree path's KV)
        self._chunk_slots: torch.Tensor | None = (
            None  # [Bv, N + 1] KV slots of the verify rows of a tree step
        )
        self._swa_chunk_slots: torch.Tensor | None = (
            None  # the same in the windowed layers' slots (hybrid pools)
        )
        self._ancestors: torch.Tensor | None = None  # [Bv, N + 1, N + 1] a tree step's ancestor masks
        self._paths: ChunkPaths | None = None  # the drafts the step's verify rows count as emitted
        self._sampler = Sampler()  # draws tree rows again at their tree positions

    @classmethod
    def create(cls, args: EngineArgs, model_config: ModelConfig) -> SpecWorker | None:
        config = SpeculativeConfig.from_args(args)
        if config is None:
            return None
        draft: DraftModel | EagleDraft | None = None
        tree = TreeShape(config.topk, config.num_steps) if config.is_tree else None
        if config.uses_mtp:  # the target's own multi-token-prediction layer (an EagleDraft)
            draft = MtpDraft.load(args, model_config, tree)
        elif config.is_eagle:
            draft = EagleDraft.load(args, model_config, config.algorithm, tree)
        elif config.uses_draft_model:
            draft = DraftModel.load(args, model_config, tree)
        return cls(config, draft)

    @property
    def needs_hidden(self) -> bool:
        """Whether every target forward must hand its hidden states to :meth:`after_forward` (EAGLE), which
        rules out the decode CUDA graphs."""
        return isinstance(self.draft, EagleDraft)

    def bind_target(self, model: nn.Module) -> None:
        """Called once the target model is loaded."""
        if isinstance(self.draft, EagleDraft):
            self.draft.bind_target(model)

    def after_forward(self, batch: ForwardBatch, hidden: torch.Tensor) -> None:
        """The target's forward pass is done (``hidden``: its final hidden states, [T, H])."""
        if isinstance(self.draft, EagleDraft):
            self.draft.capture(batch, hidden)

    def scale_capacity(
        self, capacity: KVCapacity, target_kv_bytes: int, explicit: bool, page_size: int = 1
    ) -> KVCapacity:
        """The target's planned capacity with room for the draft model's KV of every slot (unless the size was
        given explicitly, ``max_total_tokens``: then both pools take it). ``target_kv_bytes``: the target's KV bytes
        per slot (hybrid pools: per full slot, the windowed layers' share scaled by their pool's size); both of its
        pools shrink alike, to whole pages."""
        if self.draft is None or explicit:
            return capacity
        draft_bytes = self.draft.kv_bytes_per_token

        def scaled(slots: int) -> int:
            kept = slots * target_kv_bytes // (target_kv_bytes + draft_bytes)
            return max(2 * page_size, kept - kept % page_size)

        swa = scaled(capacity.swa_num_slots) if capacity.swa_num_slots else 0
        return dataclasses.replace(capacity, num_slots=scaled(capacity.num_slots), swa_num_slots=swa)

    def init_memory(self, capacity: KVCapacity, req_table: ReqToTokenTable) -> None:
        """The draft model's memory: a pool at the target's full slots (every token of its own layers, windowed
        ones too, even where the target's windowed layers keep theirs apart: ``mem_cache.hybrid_swa``)."""
        if self.draft is not None:
            self.draft.init_memory(dataclasses.replace(capacity, swa_num_slots=0), req_table)

    def before_forward(self, plan: StepPlan, input_ids: torch.Tensor) -> torch.Tensor:
        """Apply the plan to the draft model (admissions, its KV pass, drafting) and return the target's input ids
        with every verify entry's drafts in place."""
        self._drafts = self._ancestors = self._paths = None
        if self.draft is not None:
            self.draft.admit(plan)
            self._drafts, input_ids = self.draft.draft(plan, input_ids)
        elif len(plan.draft_lens) and plan.draft_lens.any():
            self._drafts = ngram_drafts_of(plan, input_ids.device)
        return input_ids

    def prepare_batch(self, plan: StepPlan, batch: ForwardBatch) -> None:
        """Before the target's attention metadata is built: a tree step's verify rows at their tree positions,
        seeing their ancestors only (``attention.base.TreeMask``)."""
        drafts = self._drafts
        self._kv_pool = batch.kv_pool
        if drafts is None or drafts.tree is None:
            return
        if not batch.attn_backend.supports_tree_mask:
            raise UnsupportedFeatureError(
                f"speculative_eagle_topk > 1: the {type(batch.attn_backend).__name__} has no tree attention "
                "mask; use attention_backend='triton' or 'torch', or speculative_eagle_topk=1",
                param="speculative_eagle_topk",
            )
        tree = drafts.tree
        verify = np.flatnonzero(plan.draft_lens > 0)
        starts = (np.cumsum(plan.extend_lens) - plan.extend_lens)[verify]
        batch.positions = tree_positions(batch.positions, tree, starts, plan.prefix_lens[verify])
        self._ancestors = ancestor_masks(tree)
        batch.tree_mask = tree_mask(tree, verify, plan.batch_size, self._ancestors)
        cols = np.minimum(np.arange(tree.parents.shape[1] + 1)[None, :], tree.sizes[:, None])
        rows = to_device(starts[:, None] + cols, batch.out_cache_loc.device)
        self._chunk_slots = batch.out_cache_loc[rows]
        swa_loc = batch.swa_out_cache_loc  # hybrid pools: the windowed layers' slots of the same rows
        self._swa_chunk_slots = swa_loc[rows] if swa_loc is not None else None

    def pending_drafts(self, step_id: int) -> StepDrafts:
        """The drafts of the step in progress, on the host (a step whose grammar masks are built from them)."""
        d = self._drafts
        if d is None:
            return StepDrafts(step_id=step_id, tokens=np.zeros((0, 0), dtype=np.int64))
        parents = d.tree.parents.cpu().numpy() if d.tree is not None else None
        return StepDrafts(step_id=step_id, tokens=d.tokens.cpu().numpy(), parents=parents)

    def admit_only(self, plan: StepPlan) -> None:
        """A plan without tokens: only its request-slot changes reach the draft model."""
        if self.draft is not None:
            self.draft.admit(plan)

    def sampling_offsets(self, plan: StepPlan, state: SamplingState) -> RowOffsets | None:
        """Before the step samples: the drafts each of its sampled rows counts as emitted (``sampling.offsets``),
        or None when no verify entry's sampling reads them (penalties, ``min_new_tokens``)."""
        self._paths = None
        if self._drafts is None:
            return None
        self._paths = draft_paths(plan, self._drafts, state, self._ancestors)
        return verify_row_offsets(plan, self._paths) if self._paths is not None else None

    def verify(
        self,
        plan: StepPlan,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        logprobs: torch.Tensor | None,
        state: SamplingState,
    ) -> Verified | None:
        """Accept the step's drafts (None when it has no verify entry)."""
        drafts, self._drafts = self._drafts, None
        paths, self._paths, self._ancestors = self._paths, None, None
        if drafts is None:
            return None
        if drafts.tree is None:
            return verify(plan, logits, tokens, logprobs, state, drafts, paths)

        def resample(
            rows: torch.Tensor, slots: np.ndarray, positions: torch.Tensor, offsets: RowOffsets | None
        ) -> torch.Tensor:
            out = self._sampler.sample(
                rows, torch.from_numpy(slots), positions, state, return_logprobs=False, offsets=offsets
            )
            return out.next_token_ids

        verified, path, accepted = verify_tree(
            plan, logits, tokens, logprobs, state, drafts.tree, resample, paths
        )
        assert self._kv_pool is not None and self._chunk_slots is not None
        pool = self._kv_pool
        buffers = pool_buffers(pool)
        if self.draft is not None:
            buffers += self.draft.moved_buffers
        move_path(buffers, self._chunk_slots, path, accepted)
        if self._swa_chunk_slots is not None:  # hybrid pools: the windowed layers' KV, in their own slots
            move_path(pool_buffers(pool, swa=True), self._swa_chunk_slots, path, accepted)
        self._chunk_slots = self._swa_chunk_slots = None
        return verified
