"""The STANDALONE drafter: a small model with the target's vocabulary, run by the same runner code.

KV layout: the draft model has its own KV pool with as many slots as the target's, and shares the target's
request table — a token's draft KV lives at the same slot index as its target KV. The scheduler's one allocator,
prefix cache, preemption and rollback therefore keep both consistent with no bookkeeping of their own, provided
every token the target computes is computed by the draft model too. So each step the draft model:

1. runs pass 0 over the plan: every non-verify entry's tokens (prefill chunks, plain decodes: KV only) and the
   first token ``x`` of each verify entry, whose logits give the first draft ``d_1``;
2. runs pass ``i = 1 .. k`` over the verify entries, a decode of ``d_i`` at position ``L + i`` (``L``: the
   position of ``x``), whose logits give ``d_{i+1}``; the last pass only writes ``d_k``'s KV.

On CUDA the chain passes ``1 .. k`` replay CUDA graphs of the draft model's decode step (``CudaGraphRunner`` over
the shared request table; the drafted tokens are copied in on the device); pass 0 and tree searches run eagerly.

Pass ``i`` writes the slot the target's verify writes for the same position, and the rollback of rejected drafts
frees both together. Greedy requests draft the argmax; sampled ones draw from the draft model's processed
distribution ``q`` (same temperature/top-k/top-p/min-p/logit bias) with a seed derived from the request's, and
``q`` is kept for the acceptance test (``speculative.verify``). The draft model's sampling state holds each request
without penalties or ``min_new_tokens`` (it never sees the emitted tokens): the acceptance rule is exact for any
``q`` the drafts were drawn from, and ``q`` is then the same in the draw and in the test.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import torch

from sgl_ray.runner.cuda_graph import CudaGraphRunner
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.sampling.state import Admission
from sgl_ray.scheduler.plan import StepPlan
from sgl_ray.speculative.draft_runner import check_draft_vocabulary, draft_batch, draft_runner_args
from sgl_ray.speculative.tree import BranchRows, TreeShape, place_tree, scratch_slots, search_tree
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


def draft_sampling(params: SamplingParams) -> SamplingParams:
    """A request's sampling in the draft model: the same, less what reads its emitted tokens (penalties,
    ``min_new_tokens``), which the draft model's state never counts."""
    if not params.needs_penalties and params.min_new_tokens == 0:
        return params
    return msgspec.structs.replace(
        params, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, min_new_tokens=0
    )


class DraftModel:
    """Example::

    >>> draft = DraftModel.load(args, target_model_config)  # doctest: +SKIP
    >>> draft.init_memory(capacity, target_runner.req_table)  # doctest: +SKIP
    >>> drafts, target_ids = draft.draft(plan, plan_ids)  # each step, before the target's forward  # doctest: +SKIP
    """

    def __init__(self, runner: ModelRunner, tree: TreeShape | None = None, graph_max_bs: int = 0) -> None:
        self.runner = runner
        self.tree = tree  # tree drafts (speculative.tree); None: chains
        self.graph_max_bs = graph_max_bs  # > 0: chain decode passes replay CUDA graphs up to this batch size
        self.graphs: CudaGraphRunner | None = None

    @classmethod
    def load(cls, args: EngineArgs, target: ModelConfig, tree: TreeShape | None = None) -> DraftModel:
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
        graphs = runner.device.type == "cuda" and not args.disable_cuda_graph and tree is None
        return cls(runner, tree, args.cuda_graph_max_bs if graphs else 0)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.runner.config.kv_bytes_per_token()

    def init_memory(self, capacity: KVCapacity, req_table: ReqToTokenTable) -> None:
        """A KV pool as large as the target's (with trees: and scratch slots past it), and the target's request
        table."""
        self.scratch = capacity.num_slots
        if self.tree is not None:
            extra = scratch_slots(capacity.max_reqs, *self.tree)
            capacity = dataclasses.replace(capacity, num_slots=capacity.num_slots + extra)
            dev = self.runner.device
            self.token_pool = torch.zeros(self.scratch, dtype=torch.int64, device=dev)  # x_p by KV slot
            self.frontier = np.zeros(capacity.max_reqs, dtype=np.int64)  # first position without draft KV
        self.runner.init_memory(capacity)
        self.runner.req_table = req_table
        if self.graph_max_bs > 0:
            self._capture_graphs(capacity.max_reqs)

    def _capture_graphs(self, max_reqs: int) -> None:
        """CUDA graphs of the draft model's decode step over the target's request table (chains: each decode pass
        of a step is one replay; graph bugs here could only cost acceptance, never the target's tokens, as long
        as the table writes are those of the target's plan)."""
        r = self.runner
        moe = r.moe_backend
        if not r.attn_backend.supports_cuda_graph or (moe is not None and not moe.supports_cuda_graph):
            return
        no_future = torch.zeros(max_reqs, dtype=torch.int64, device=r.device)  # drafts are never FUTURE_TOKEN
        self.graphs = CudaGraphRunner(
            r.model,
            r.attn_backend,
            r.kv_pool,
            r.req_table.table,
            no_future,
            min(self.graph_max_bs, max_reqs),
            r.config.context_length,
            moe_backend=moe,
        )

    def admit(self, plan: StepPlan) -> None:
        """The plan's request-slot changes, in the draft model's sampling state."""
        state = self.runner.sampling_state
        state.clear_requests(plan.freed_req_pool_idxs)
        state.set_requests(
            [
                Admission(
                    r.req_pool_idx, draft_sampling(r.sampling), draft_seed(r.seed), r.eos_token_ids, [], []
                )
                for r in plan.new_requests
            ]
        )
        if self.tree is not None:  # cached draft KV may miss a finished request's last accepted tokens
            for r in plan.new_requests:
                self.frontier[r.req_pool_idx] = 0

    @property
    def moved_buffers(self) -> list[torch.Tensor]:
        """What is kept by KV slot besides the target's KV (moved with an accepted tree path)."""
        return [self.token_pool]

    def draft(self, plan: StepPlan, input_ids: torch.Tensor) -> tuple[Drafts | None, torch.Tensor]:
        """Run the draft passes of a step (see the module note). ``input_ids`` [T]: the plan's tokens on the device
        (drafts still placeholders). Returns the drafts and the target's input ids with the drafts in place."""
        if self.tree is not None:
            return self._draft_tree(plan, input_ids)
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
            logits = self._decode(
                tokens[to_device(step, dev), i],
                prefix[b] + i + 1,
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

    def _draft_tree(self, plan: StepPlan, input_ids: torch.Tensor) -> tuple[Drafts | None, torch.Tensor]:
        """Tree drafts: pass 0 over every entry's rows from its frontier (the accepted tokens of its previous
        verify step have no draft KV yet: their tree's was scratch) up to its first token, then the tree search
        (``speculative.tree``) with each branch a decode row."""
        assert self.tree is not None
        lens = plan.draft_lens if len(plan.draft_lens) else np.zeros(plan.batch_size, dtype=np.int64)
        ext, prefix, reqs = plan.extend_lens, plan.prefix_lens, plan.req_pool_idxs
        starts = np.cumsum(ext) - ext
        verify = np.flatnonzero(lens > 0)  # [Bv]
        dev = input_ids.device
        self.token_pool[to_device(plan.out_cache_loc, dev)] = input_ids  # drafts are written over below
        lo = np.minimum(self.frontier[reqs], prefix)  # [B] first row without draft KV
        end = prefix + np.where(lens > 0, 1, ext)  # [B] one past the pass's last row
        self.frontier[reqs] = end
        n = end - lo  # [B] rows of pass 0
        total = int(n.sum())
        first = np.cumsum(n) - n
        pos = np.repeat(lo, n) + np.arange(total) - np.repeat(first, n)
        slots = self.runner.req_table.table[to_device(np.repeat(reqs, n), dev), to_device(pos, dev)]
        tokens = self.token_pool[slots]  # the plan's own tokens were just stored there
        last = to_device(first[verify] + n[verify] - 1, dev)  # [Bv] each verify entry's row of x
        hidden = self.runner.model(draft_batch(self.runner, tokens, lo, n, reqs, slots, last), None)
        if len(verify) == 0:
            return None, input_ids
        logits = self.runner.model.compute_logits(hidden[last])
        topk, steps = self.tree
        branches = BranchRows(
            self.runner.req_table.table, reqs[verify], prefix[verify], topk, steps, self.scratch
        )

        def expand(depth: int, tokens: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
            positions, out_loc = branches.advance(depth, origin)
            rows = len(positions)
            batch = draft_batch(
                self.runner,
                tokens.reshape(-1),
                positions,
                np.ones(rows, dtype=np.int64),
                np.arange(rows),
                out_loc,
                branches.row_ids,
                req_to_token=branches.rows,
            )
            hidden = self.runner.model(batch, None)
            lp = torch.log_softmax(self.runner.model.compute_logits(hidden).float(), dim=-1)
            return lp.view(*origin.shape, -1)

        root = torch.log_softmax(logits.float(), dim=-1)
        tree = search_tree(root, expand, topk, steps, lens[verify])
        ids = place_tree(input_ids, tree, starts[verify])
        self.token_pool[to_device(plan.out_cache_loc, dev)] = ids
        return Drafts(tree.tokens, None, tree), ids

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

    def _decode(
        self,
        input_ids: torch.Tensor,
        positions: np.ndarray,
        req_pool_idxs: np.ndarray,
        out_cache_loc: np.ndarray,
        logit_rows: np.ndarray,
    ) -> torch.Tensor:
        """A decode pass (one token per request at ``positions``): a graph replay where one fits, else
        :meth:`_forward`; the logits of rows ``logit_rows``."""
        graphs = self.graphs
        if graphs is not None and graphs.can_run(len(req_pool_idxs)):
            logits = graphs.replay(input_ids, positions, out_cache_loc, req_pool_idxs)
            return logits[to_device(logit_rows, logits.device)]
        ones = np.ones(len(req_pool_idxs), dtype=np.int64)
        return self._forward(input_ids, positions, ones, req_pool_idxs, out_cache_loc, logit_rows)

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
