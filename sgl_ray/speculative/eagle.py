"""The EAGLE and EAGLE-3 drafters: a one-layer head over the target's hidden states (``models.llama_eagle``).

The head's row at position ``p`` is the pair ``(x_{p+1}, f_p)``: the token after ``p`` and the target's hidden
state at ``p`` (EAGLE-3: ``fc`` over three captured layer inputs). It can be computed only once the target has run
position ``p`` and ``x_{p+1}`` is known, so the head lags the target by one step:

* after every target forward, :meth:`EagleDraft.capture` stores each new token and its hidden state by KV slot
  (``token_pool``, ``hidden_pool``: as many slots as the target's KV pool, so the scheduler's allocator, prefix
  cache, preemption and rollback keep them right, as they do the head's one-layer KV pool);
* at the next step, before the target's forward, :meth:`EagleDraft.draft` first extends the head over every
  request's pending rows ``[frontier, P)`` (``P``: the request's ``prefix_len`` in this plan, the position of its
  newest token ``x_P``, which the plan carries; ``frontier``: the ``P`` of its previous step), which rewrites the
  draft KV of accepted positions with real states and drops what the draft passes of the previous step guessed;
* a verify entry's last extend row ``(x_P, f_{P-1})`` gives ``d_1``; then decode pass ``j = 1 .. k-1`` runs the row
  ``(d_j, ĥ)`` at position ``P + j - 1`` (``ĥ``: the head's own output of the pass before) and gives ``d_{j+1}``.
  Pass ``j`` writes the head's KV at the slot of the verify's row ``j - 1``; the next step's extend rewrites it.

Drafts are the head's argmax (deterministic drafts: ``speculative.verify`` keeps the target's distribution for
sampled requests too, penalties and ``min_new_tokens`` included: they act on the target's verify rows only, so the
head has no sampling state to keep in step). A newly admitted request (a cached prefix, or a resume after
preemption) starts its frontier at 0: the head recomputes its rows over the whole cached prefix (one layer per
token), since cached draft rows can be missing (the last step of the request that left them) or built on another
continuation.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from sgl_ray.errors import InvalidRequestError, UnsupportedFeatureError
from sgl_ray.runner.forward_batch import ForwardBatch
from sgl_ray.scheduler.plan import StepPlan
from sgl_ray.speculative.draft_runner import draft_batch, draft_runner_args
from sgl_ray.speculative.tree import BranchRows, TreeShape, place_tree, scratch_slots, search_tree
from sgl_ray.speculative.verify import Drafts
from sgl_ray.transfer import to_device

if TYPE_CHECKING:
    from torch import nn

    from sgl_ray.configs.engine_args import EngineArgs
    from sgl_ray.configs.model_config import ModelConfig
    from sgl_ray.mem_cache.kv_pool import ReqToTokenTable
    from sgl_ray.models.llama_eagle import LlamaForCausalLMEagle
    from sgl_ray.runner.memory import KVCapacity
    from sgl_ray.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_ARCHITECTURES = {"EAGLE": "LlamaForCausalLMEagle", "EAGLE3": "LlamaForCausalLMEagle3"}


def _bad_path(msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"speculative_draft_model_path: {msg}", param="speculative_draft_model_path")


class EagleDraft:
    """Example::

    >>> draft = EagleDraft.load(args, target_model_config, "EAGLE3")  # doctest: +SKIP
    >>> draft.bind_target(target_model)  # shared embedding/LM head, the target's captured layers  # doctest: +SKIP
    >>> draft.init_memory(capacity, target_runner.req_table)  # doctest: +SKIP
    >>> drafts, target_ids = draft.draft(plan, plan_ids)  # before the target's forward  # doctest: +SKIP
    >>> draft.capture(target_batch, target_hidden)  # after it  # doctest: +SKIP
    """

    def __init__(self, runner: ModelRunner, target: ModelConfig, tree: TreeShape | None = None) -> None:
        self.runner = runner
        self.head: LlamaForCausalLMEagle = runner.model
        self.target = target
        self.tree = tree  # tree drafts (speculative.tree); None: chains

    @classmethod
    def load(
        cls, args: EngineArgs, target: ModelConfig, algorithm: str, tree: TreeShape | None = None
    ) -> EagleDraft:
        """Load the head at ``args.speculative_draft_model_path`` (an EAGLE checkpoint directory or hub id)."""
        from sgl_ray.configs.model_config import ModelConfig
        from sgl_ray.model_loader import WeightStream, load_hf_config, resolve_model
        from sgl_ray.runner.model_runner import ModelRunner

        path = args.speculative_draft_model_path
        assert path is not None
        source = resolve_model(path, weights=args.load_format != "dummy")
        hf = load_hf_config(source)
        if hf.vocab_size != target.vocab_size:
            raise _bad_path(
                f"the EAGLE head {path!r} is for a vocabulary of {hf.vocab_size} tokens, the target has "
                f"{target.vocab_size}"
            )
        eagle3 = algorithm == "EAGLE3"
        reads = int(getattr(hf, "target_hidden_size", None) or hf.hidden_size) if eagle3 else hf.hidden_size
        if reads != target.hidden_size:
            raise _bad_path(
                f"the EAGLE head {path!r} reads hidden states of width {reads}, the target's are "
                f"{target.hidden_size}"
            )
        if getattr(hf, "num_hidden_layers", 1) != 1:
            raise _bad_path(f"an EAGLE head has one decoder layer; {path!r} has {hf.num_hidden_layers}")
        hf.architectures = [_ARCHITECTURES[algorithm]]  # EAGLE-1 repositories often say LlamaForCausalLM
        config = ModelConfig(hf, target.dtype, target.context_length)
        runner = ModelRunner(draft_runner_args(args, path), config, WeightStream(source), allocate=False)
        logger.info("%s head %s: %.1f MiB of weights", algorithm, path, runner.weight_bytes / 2**20)
        return cls(runner, target, tree)

    def bind_target(self, target: nn.Module) -> None:
        """Share the target's embedding / LM head where the checkpoint has none, and make an EAGLE-3 target
        capture the layer inputs its ``fc`` reads."""
        from sgl_ray.models.llama_eagle import eagle3_capture_layers

        self.head.share_target_weights(target)
        if self.head.eagle3:
            body = target.model
            if not hasattr(body, "capture_layers"):
                raise UnsupportedFeatureError(
                    f"speculative_algorithm='EAGLE3' needs a Llama-style target; {type(target).__name__} cannot "
                    "return its intermediate hidden states",
                    param="speculative_algorithm",
                )
            body.capture_layers = eagle3_capture_layers(self.head.config.hf_config, self.target.num_layers)

    @property
    def kv_bytes_per_token(self) -> int:
        """The head's KV and the stored token and hidden state of each slot."""
        element = torch.empty(0, dtype=self.target.dtype).element_size()
        return self.runner.config.kv_bytes_per_token() + self.head.config.hidden_size * element + 8

    def init_memory(self, capacity: KVCapacity, req_table: ReqToTokenTable) -> None:
        r = self.runner
        self.scratch = capacity.num_slots  # with trees, the branches' head KV lives past the target's slots
        extra = scratch_slots(capacity.max_reqs, *self.tree) if self.tree is not None else 0
        r.init_memory(dataclasses.replace(capacity, num_slots=capacity.num_slots + extra))
        r.req_table = req_table
        h, dev = self.head.config.hidden_size, r.device
        # f_p and x_p by KV slot
        self.hidden_pool = torch.zeros(capacity.num_slots, h, dtype=self.target.dtype, device=dev)
        self.token_pool = torch.zeros(capacity.num_slots, dtype=torch.int64, device=dev)
        self.frontier = np.zeros(capacity.max_reqs, dtype=np.int64)  # first position without its real row

    def admit(self, plan: StepPlan) -> None:
        for r in plan.new_requests:
            self.frontier[r.req_pool_idx] = 0

    @property
    def moved_buffers(self) -> list[torch.Tensor]:
        """What is kept by KV slot besides the target's KV (moved with an accepted tree path)."""
        return [self.hidden_pool, self.token_pool]

    def capture(self, batch: ForwardBatch, hidden: torch.Tensor) -> None:
        """Store the target's tokens and hidden states of a forward pass ([T, H], final) by KV slot."""
        projected = self.head.project_target(hidden, batch.captured_hidden or [])
        self.hidden_pool[batch.out_cache_loc] = projected.to(self.hidden_pool.dtype)
        self.token_pool[batch.out_cache_loc] = batch.input_ids
        batch.captured_hidden = None

    def draft(self, plan: StepPlan, input_ids: torch.Tensor) -> tuple[Drafts | None, torch.Tensor]:
        """Extend the head over the pending rows and draft (see the module note). ``input_ids`` [T]: the plan's
        tokens on the device (drafts still placeholders). Returns the drafts and the target's input ids."""
        lens = plan.draft_lens if len(plan.draft_lens) else np.zeros(plan.batch_size, dtype=np.int64)
        ext, prefix, reqs = plan.extend_lens, plan.prefix_lens, plan.req_pool_idxs
        starts = np.cumsum(ext) - ext  # [B] first token of each entry
        lo = np.minimum(self.frontier[reqs], prefix)  # [B] first pending row
        self.frontier[reqs] = prefix
        n = prefix - lo  # [B] pending rows
        verify = np.flatnonzero(lens > 0)  # [Bv]
        assert (n[verify] > 0).all(), "a verify entry has a pending row: its newest token's predecessor"
        dev = input_ids.device
        ext_idx = np.flatnonzero(n > 0)  # entries of the extend pass
        if len(ext_idx) == 0:
            return None, input_ids
        counts = n[ext_idx]
        total = int(counts.sum())
        pos = (
            np.repeat(lo[ext_idx], counts) + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        )
        owner = to_device(np.repeat(reqs[ext_idx], counts), dev)
        pos_t = to_device(pos, dev)
        table = self.runner.req_table.table
        cur = table[owner, pos_t].long()  # [R] KV slot of each row's position
        nxt = self.token_pool[table[owner, pos_t + 1].long()]  # x_{p+1} where the target has run p + 1
        newest = input_ids[to_device(np.repeat(starts[ext_idx], counts), dev)]  # the plan's x_P
        tokens = torch.where(to_device(pos + 1 == np.repeat(prefix[ext_idx], counts), dev), newest, nxt)
        out, to_logits = self._forward(tokens, self.hidden_pool[cur], lo[ext_idx], counts, reqs[ext_idx], cur)
        k = int(lens.max(initial=0))
        if k == 0:
            return None, input_ids
        # the row (x_P, f_{P-1}) of each verify entry
        last = (np.cumsum(counts) - 1)[np.searchsorted(ext_idx, verify)]
        last_t = to_device(last, dev)
        hidden = out[last_t]  # [Bv, H] the head's state after each verify entry's newest row
        if self.tree is not None:
            return self._draft_tree(plan, input_ids, hidden, to_logits[last_t], verify)
        drafted = torch.zeros(len(verify), k, dtype=torch.int64, device=dev)  # [Bv, K] d_1 .. d_K
        drafted[:, 0] = self.head.greedy_tokens(self.head.compute_logits(to_logits[last_t]))
        vlens = lens[verify]
        active = np.arange(len(verify))
        for j in range(1, k):
            active = active[vlens[active] > j]  # entries that draft d_{j+1}
            if len(active) == 0:
                break
            a, b = to_device(active, dev), verify[active]
            out, to_logits = self._forward(
                drafted[a, j - 1],
                hidden[a],
                prefix[b] + j - 1,
                np.ones(len(b), dtype=np.int64),
                reqs[b],
                to_device(plan.out_cache_loc[starts[b] + j - 1], dev),
            )
            hidden[a] = out
            drafted[a, j] = self.head.greedy_tokens(self.head.compute_logits(to_logits))
        cols = np.concatenate([np.arange(m) for m in vlens])
        row_of = np.repeat(np.arange(len(verify)), vlens)
        ids = input_ids.clone()
        ids[to_device(np.repeat(starts[verify], vlens) + 1 + cols, dev)] = drafted[
            to_device(row_of, dev), to_device(cols, dev)
        ]
        return Drafts(drafted, None), ids

    def _draft_tree(
        self,
        plan: StepPlan,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,  # [Bv, H] the head's output at each verify entry's row (x_P, f_{P-1})
        to_logits: torch.Tensor,  # [Bv, H] what its LM head reads there
        verify: np.ndarray,  # [Bv]
    ) -> tuple[Drafts, torch.Tensor]:
        """The tree search (``speculative.tree``): a node at depth ``j`` is the head's row ``(token, ĥ)`` at
        position ``P + j - 1``, ``ĥ`` its parent's output, run as a decode row over the branch's own head KV."""
        assert self.tree is not None
        topk, steps = self.tree
        reqs, prefix = plan.req_pool_idxs[verify], plan.prefix_lens[verify]
        starts = (np.cumsum(plan.extend_lens) - plan.extend_lens)[verify]
        branches = BranchRows(self.runner.req_table.table, reqs, prefix - 1, topk, steps, self.scratch)
        state = {"hidden": hidden[:, None, :]}  # [Bv, rows of the previous depth, H]

        def expand(depth: int, tokens: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
            positions, out_loc = branches.advance(depth, origin)
            prev = state["hidden"]
            h_in = prev.gather(1, origin[:, :, None].expand(-1, -1, prev.shape[2]))  # [Bv, k, H]
            rows = len(positions)
            out, head_in = self._forward(
                tokens.reshape(-1),
                h_in.reshape(rows, -1),
                positions,
                np.ones(rows, dtype=np.int64),
                np.arange(rows),
                out_loc,
                req_to_token=branches.rows,
            )
            state["hidden"] = out.view(*origin.shape, -1)
            lp = torch.log_softmax(self.head.compute_logits(head_in), dim=-1)
            return lp.view(*origin.shape, -1)

        root = torch.log_softmax(self.head.compute_logits(to_logits), dim=-1)
        d2t = self.head.d2t
        tree = search_tree(root, expand, topk, steps, plan.draft_lens[verify], lambda ids: ids + d2t[ids])
        return Drafts(tree.tokens, None, tree), place_tree(input_ids, tree, starts)

    def _forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        prefix: np.ndarray,
        ext: np.ndarray,
        req_pool_idxs: np.ndarray,
        out_cache_loc: torch.Tensor,
        req_to_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the head over rows ``(input_ids, hidden)`` ([T], [T, H]); returns its next hidden input and
        what its LM head reads, both [T, H]."""
        no_logits = to_device(np.zeros(0, dtype=np.int64), input_ids.device)
        batch = draft_batch(
            self.runner, input_ids, prefix, ext, req_pool_idxs, out_cache_loc, no_logits, req_to_token
        )
        return self.head(batch, hidden)
