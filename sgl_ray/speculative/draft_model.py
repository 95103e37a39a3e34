"""The STANDALONE drafter: a small model with the target's vocabulary, run by the same runner code.

KV layout: the draft model has its own KV pool with as many slots as the target's, and shares the target's
request table — a token's draft KV lives at the same slot index as its target KV. The scheduler's one allocator,
prefix cache, preemption and rollback therefore keep both consistent with no bookkeeping of their own, provided
every token the target computes is computed by the draft model too. So each step the draft model:

1. runs pass 0 over the plan: every non-verify entry's tokens (prefill chunks, plain decodes: KV only) and the
   first token ``x`` of each verify entry, whose logits give the first draft ``d_1``;
2. runs pass ``i = 1 .. k`` over the verify entries, a decode of ``d_i`` at position ``L + i`` (``L``: the
   position of ``x``), whose logits give ``d_{i+1}``; the last pass only writes ``d_k``'s KV.

Pass ``i`` writes the slot the target's verify writes for the same position, and the rollback of rejected drafts
frees both together. Greedy requests draft the argmax; sampled ones draw from the draft model's processed
distribution ``q`` (same temperature/top-k/top-p/min-p) with a seed derived from the request's, and ``q`` is kept
for the acceptance test (``speculative.verify``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sgl_ray.errors import InvalidRequestError
from sgl_ray.runner.forward_batch import ForwardBatch
from sgl_ray.sampling.state import Admission
from sgl_ray.scheduler.plan import StepPlan
from sgl_ray.speculative.verify import Drafts, processed_logprobs
from sgl_ray.transfer import to_device

if TYPE_CHECKING:
    from sgl_ray.configs.engine_args import EngineArgs
    from sgl_ray.configs.model_config import ModelConfig
    from sgl_ray.mem_cache.kv_pool import ReqToTokenTable
    from sgl_ray.runner.memory import KVCapacity
    from sgl_ray.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_SEED_MIX = 0xD1B54A32D192ED03
_SEED_MASK = (1 << 63) - 1


def draft_seed(seed: int) -> int:
    """The draft model's seed for a request: its own noise, independent of the target's."""
    return ((seed ^ _SEED_MIX) * 0x9E3779B97F4A7C15 + 1) & _SEED_MASK


def check_draft_vocabulary(target_vocab_size: int, draft_hf_config: Any, path: str) -> None:
    if draft_hf_config.vocab_size != target_vocab_size:
        raise InvalidRequestError(
            f"speculative_draft_model_path: the draft model {path!r} has a vocabulary of "
            f"{draft_hf_config.vocab_size} tokens, the target {target_vocab_size}; a draft model must share the "
            "target's tokenizer and vocabulary",
            param="speculative_draft_model_path",
        )


def draft_runner_args(args: Any, path: str) -> Any:
    """The engine options of a draft runner (a draft model or an EAGLE head) at ``path``: the target's, less what
    belongs to the target alone (its tokenizer, quantization, LoRA, CUDA graphs, speculative decoding itself)."""
    return args.replace(
        model_path=path,
        tokenizer_path=None,
        revision=None,
        quantization=None,
        enable_lora=False,
        lora_paths=None,
        disable_cuda_graph=True,
        speculative_algorithm=None,
        speculative_draft_model_path=None,
    )


def draft_batch(
    runner: Any,
    input_ids: torch.Tensor,
    prefix: np.ndarray,
    ext: np.ndarray,
    req_pool_idxs: np.ndarray,
    out_cache_loc: torch.Tensor,
    logits_indices: torch.Tensor,
) -> ForwardBatch:
    """A draft runner's extend batch over ``ext`` new tokens per request after ``prefix`` cached ones, its
    attention metadata initialized (the request table already maps every position it reads)."""
    dev = input_ids.device
    starts = np.cumsum(ext) - ext
    positions = np.repeat(prefix - starts, ext) + np.arange(int(ext.sum()))
    batch = ForwardBatch(
        input_ids=input_ids,
        positions=to_device(positions, dev),
        out_cache_loc=out_cache_loc,
        req_pool_idxs=to_device(req_pool_idxs, dev),
        seq_lens=to_device(prefix + ext, dev),
        extend_start_loc=to_device(starts, dev),
        logits_indices=logits_indices,
        prefix_lens_cpu=prefix,
        extend_lens_cpu=ext,
        kv_pool=runner.kv_pool,
        req_to_token=runner.req_table.table,
        attn_backend=runner.attn_backend,
        moe_backend=runner.moe_backend,
    )
    runner.attn_backend.init_forward_metadata(batch)
    return batch


def check_draft_tokenizer(target_tokenizer: Any, path: str) -> None:
    """Where the draft model ships a tokenizer, it must map the same strings to the same ids as the target's."""
    from sgl_ray.model_loader import load_tokenizer, resolve_model

    if target_tokenizer is None:
        return
    try:
        draft = load_tokenizer(resolve_model(path, weights=False))
    except Exception:  # noqa: BLE001 - no tokenizer files: the vocabulary size was checked
        return
    if draft.get_vocab() != target_tokenizer.get_vocab():
        raise InvalidRequestError(
            f"speculative_draft_model_path: the tokenizer of the draft model {path!r} differs from the target's "
            "(same size, different tokens); a draft model must share the target's vocabulary",
            param="speculative_draft_model_path",
        )


class DraftModel:
    """Example::

    >>> draft = DraftModel.load(args, target_model_config)  # doctest: +SKIP
    >>> draft.init_memory(capacity, target_runner.req_table)  # doctest: +SKIP
    >>> drafts, target_ids = draft.draft(plan, plan_ids)  # each step, before the target's forward  # doctest: +SKIP
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    @classmethod
    def load(cls, args: EngineArgs, target: ModelConfig) -> DraftModel:
        """Load ``args.speculative_draft_model_path`` with the target's dtype and context length (no KV yet)."""
        from sgl_ray.configs.model_config import ModelConfig
        from sgl_ray.model_loader import WeightStream, load_hf_config, resolve_model
        from sgl_ray.runner.model_runner import ModelRunner

        path = args.speculative_draft_model_path
        assert path is not None
        check_draft_vocabulary(target.vocab_size, load_hf_config(resolve_model(path, weights=False)), path)
        source = resolve_model(path, weights=args.load_format != "dummy")
        hf_config = load_hf_config(source)
        config = ModelConfig(hf_config, target.dtype, target.context_length)
        runner = ModelRunner(draft_runner_args(args, path), config, WeightStream(source), allocate=False)
        logger.info("draft model %s: %.1f MiB of weights", path, runner.weight_bytes / 2**20)
        return cls(runner)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.runner.config.kv_bytes_per_token()

    def init_memory(self, capacity: KVCapacity, req_table: ReqToTokenTable) -> None:
        """A KV pool as large as the target's, and the target's request table."""
        self.runner.init_memory(capacity)
        self.runner.req_table = req_table

    def admit(self, plan: StepPlan) -> None:
        """The plan's request-slot changes, in the draft model's sampling state."""
        state = self.runner.sampling_state
        state.clear_requests(plan.freed_req_pool_idxs)
        state.set_requests(
            [
                Admission(r.req_pool_idx, r.sampling, draft_seed(r.seed), r.eos_token_ids, [], [])
                for r in plan.new_requests
            ]
        )

    def draft(self, plan: StepPlan, input_ids: torch.Tensor) -> tuple[Drafts | None, torch.Tensor]:
        """Run the draft passes of a step (see the module note). ``input_ids`` [T]: the plan's tokens on the device
        (drafts still placeholders). Returns the drafts and the target's input ids with the drafts in place."""
        lens = plan.draft_lens if len(plan.draft_lens) else np.zeros(plan.batch_size, dtype=np.int64)
        ext, prefix = plan.extend_lens, plan.prefix_lens
        starts = np.cumsum(ext) - ext  # [B] first token of each entry
        verify = np.flatnonzero(lens > 0)  # [Bv]
        k = int(lens.max(initial=0))
        dev = input_ids.device
        # Pass 0: every entry's tokens, verify entries only their first.
        ext0 = np.where(lens > 0, 1, ext)
        starts0 = np.cumsum(ext0) - ext0
        take = np.repeat(starts, ext0) + np.arange(int(ext0.sum())) - np.repeat(starts0, ext0)
        logits = self._forward(
            input_ids[to_device(take, dev)],
            prefix,
            ext0,
            plan.req_pool_idxs,
            plan.out_cache_loc[take],
            starts0[verify],
        )
        if k == 0:
            return None, input_ids
        slots = plan.req_pool_idxs[verify]
        sampled = ~self.runner.sampling_state.greedy_slots(slots)  # [Bv]
        tokens = torch.zeros(len(verify), k, dtype=torch.int64, device=dev)  # [Bv, K] d_1 .. d_K
        log_q = None  # [Bv, K, V]; rows past an entry's drafts stay unset (never read)
        if sampled.any():
            log_q = torch.empty(len(verify), k, self.runner.config.vocab_size, device=dev)
        active = np.arange(len(verify))  # entries whose next draft these logits give
        for i in range(k):
            # logits of `active` give d_{i+1} at position L + i + 1
            tokens[to_device(active, dev), i] = self._sample(
                logits, slots[active], prefix[verify][active] + i + 1
            )
            if log_q is not None and sampled[active].any():
                rows = np.flatnonzero(sampled[active])
                log_q[to_device(active[rows], dev), i] = processed_logprobs(
                    logits[to_device(rows, dev)], self.runner.sampling_state, slots[active][rows]
                )
            # pass i + 1: decode d_{i+1} at L + i + 1 for the entries that drafted it
            step = active[lens[verify][active] >= i + 1]
            b = verify[step]
            need = np.flatnonzero(lens[b] > i + 1)  # their logits give d_{i+2}
            logits = self._forward(
                tokens[to_device(step, dev), i],
                prefix[b] + i + 1,
                np.ones(len(b), dtype=np.int64),
                plan.req_pool_idxs[b],
                plan.out_cache_loc[starts[b] + i + 1],
                need,
            )
            active = step[need]
        # The target's input: [x, d_1 .. d_k] for each verify entry.
        cols = np.concatenate([np.arange(n) for n in lens[verify]])
        owner = np.repeat(np.arange(len(verify)), lens[verify])
        ids = input_ids.clone()
        ids[to_device(np.repeat(starts[verify], lens[verify]) + 1 + cols, dev)] = tokens[
            to_device(owner, dev), to_device(cols, dev)
        ]
        return Drafts(tokens, log_q), ids

    def _sample(self, logits: torch.Tensor, slots: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        r = self.runner
        dev = logits.device
        out = r.sampler.sample(
            logits,
            torch.from_numpy(np.ascontiguousarray(slots)),
            to_device(positions, dev),
            r.sampling_state,
            return_logprobs=False,
            slots_dev=to_device(slots, dev),
        )
        return out.next_token_ids

    def _forward(
        self,
        input_ids: torch.Tensor,
        prefix: np.ndarray,
        ext: np.ndarray,
        req_pool_idxs: np.ndarray,
        out_cache_loc: np.ndarray,
        logit_rows: np.ndarray,
    ) -> torch.Tensor:
        """One forward pass of the draft model; the logits of token rows ``logit_rows`` ([N, vocab]). The request
        table already maps every position it reads (the target's plan wrote it)."""
        r = self.runner
        dev = input_ids.device
        out_loc, logits_at = to_device(out_cache_loc, dev), to_device(logit_rows, dev)
        batch = draft_batch(r, input_ids, prefix, ext, req_pool_idxs, out_loc, logits_at)
        hidden = r.model(batch, None)  # [T, hidden]
        if len(logit_rows) == 0:
            return hidden[:0]
        return r.model.compute_logits(hidden[to_device(logit_rows, dev)])
