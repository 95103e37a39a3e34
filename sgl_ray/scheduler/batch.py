"""One scheduled step: which requests compute how many tokens, turned into a :class:`StepPlan`, and the
mapping of the runner's results back to requests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from sgl_ray.lora.pool import AdapterPool
from sgl_ray.scheduler.grammar import GrammarTracker
from sgl_ray.scheduler.kv_manager import KVCacheManager
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.scheduler.plan import DRAFT_TOKEN, FUTURE_TOKEN, NewRequest, StepDrafts, StepOutput, StepPlan
from sgl_ray.scheduler.request import Req

Sampled = tuple[int, float | None, np.ndarray | None, np.ndarray | None]  # token, logprob, top ids, top vals


@dataclass
class BatchEntry:
    req: Req
    prefix_len: int  # tokens with KV before this step
    extend_len: int
    sample: bool
    new: bool
    num_sample: int = 1  # sampled rows at the end of the chunk (> 1: verifying jump-forward tokens)
    row_tokens: list[int] = field(default_factory=list)  # what those rows sampled
    input_lp_start: int = -1  # first prompt position whose logprob this step returns
    input_lp_count: int = 0
    input_logprobs: list[float] = field(default_factory=list)
    input_top: list[list[tuple[float, int]]] = field(default_factory=list)
    # Speculative decoding (``spec``: a decode step of a speculating request, with ``drafts`` after its token)
    spec: bool = False
    drafts: list[int] = field(default_factory=list)  # ids, or DRAFT_TOKEN (the draft model writes it)
    row_masks: np.ndarray | None = None  # [len(drafts) + 1, W] grammar masks of its rows
    draft_parents: list[int] | None = None  # an NGRAM tree: each node's parent row (0: the request's token)
    num_emitted: int = 1  # tokens its rows emit (kept drafts + 1), from the runner
    # Planned while the request's previous step, verifying this many drafts, was in flight (overlap scheduling):
    # ``prefix_len`` assumes that step keeps them all, the runner moves it back by those it rejects.
    ahead_drafts: int = 0
    ahead: bool = False  # planned while a step of the request was in flight (overlap scheduling)
    rows: tuple[int, int] = (0, 0)  # its sampled rows in the step's output

    @property
    def input_logprob_end(self) -> int:
        return self.input_lp_start + self.input_lp_count

    def fill_logprobs(self, out: RequestOutput, req: Req, sampled: Sampled | None) -> None:
        k = req.top_logprobs_num
        if sampled is not None:
            token, lp, top_ids, top_vals = sampled
            out.output_logprobs = [(lp, token)]
            if k > 0 and top_ids is not None and top_vals is not None:
                out.output_top_logprobs = [
                    [(float(v), int(i)) for v, i in zip(top_vals[:k], top_ids[:k], strict=True)]
                ]
            elif k > 0:
                out.output_top_logprobs = [[]]
        if self.input_lp_count:
            targets = req.model_prompt_ids[self.input_lp_start : self.input_logprob_end]
            lps: list[tuple[float | None, int]] = list(zip(self.input_logprobs, targets, strict=True))
            tops = [t[:k] for t in self.input_top] if k > 0 else None
            if self.input_lp_start == 1 and req.logprob_start_len == 0:
                lps.insert(0, (None, req.model_prompt_ids[0]))
                if tops is not None:
                    tops.insert(0, [])
            out.input_logprobs = lps
            out.input_top_logprobs = tops


class ScheduledBatch:
    def __init__(self, step_id: int) -> None:
        self.step_id = step_id
        self.entries: list[BatchEntry] = []
        self.num_prefill_tokens = 0
        self.plan = StepPlan(step_id=step_id)
        self._grammars: GrammarTracker | None = None  # set when the masks wait for the steps in flight

    def add(self, req: Req, extend_len: int, new: bool = False) -> None:
        """Schedule ``extend_len`` more tokens of ``req``, after those already computed or in flight."""
        prefix = req.num_computed + req.inflight_tokens
        sample = prefix + extend_len == req.num_tokens + req.inflight_samples
        entry = BatchEntry(req, prefix, extend_len, sample, new)
        if entry.sample and req.jump_tokens and req.sampling.is_greedy:
            entry.num_sample = min(len(req.jump_tokens) + 1, extend_len)
        if extend_len > 1 or not (req.output_ids or req.inflight_samples):
            self.num_prefill_tokens += extend_len
        req.in_flight = True
        req.inflight_tokens += extend_len
        req.inflight_samples += sample
        if req.wants_input_logprobs:
            lo = max(req.logprob_start_len, req.input_logprob_next, prefix + 1)
            hi = min(prefix + extend_len, len(req.prompt_ids) - 1)
            if hi >= lo:
                entry.input_lp_start, entry.input_lp_count = lo, hi - lo + 1
        self.entries.append(entry)

    def add_verify(
        self,
        req: Req,
        drafts: list[int],
        row_masks: np.ndarray | None = None,
        parents: list[int] | None = None,
    ) -> None:
        """Schedule a decode step of ``req`` that also verifies ``drafts`` (its KV slots already allocated): the
        chunk ``[last token, drafts...]``, every row sampled. With a step of ``req`` in flight (overlap
        scheduling), the chunk starts where it would if that step kept every draft it verifies."""
        prefix = req.num_computed + req.inflight_tokens
        n = 1 + len(drafts)
        self.entries.append(
            BatchEntry(
                req,
                prefix,
                n,
                True,
                False,
                num_sample=n,
                spec=True,
                drafts=drafts,
                row_masks=row_masks,
                draft_parents=parents,
                ahead_drafts=req.inflight_drafts,
                ahead=req.in_flight,
            )
        )
        req.in_flight = True
        req.inflight_tokens += n
        req.inflight_samples += 1
        req.inflight_drafts += len(drafts)

    def finalize(
        self, kv: KVCacheManager, lora: AdapterPool | None = None, grammars: GrammarTracker | None = None
    ) -> ScheduledBatch:
        entries = self.entries
        plan = self.plan
        plan.freed_req_pool_idxs = kv.take_freed_req_slots()
        if lora is not None:
            plan.lora_loads = lora.take_loads()
        plan.new_requests = [_new_request(e.req) for e in entries if e.new]
        plan.table_req, plan.table_pos, plan.table_slot = kv.take_table_writes()
        plan.swa_map_pages, plan.swa_map_values = kv.take_swa_map_writes()
        if not entries:
            return self
        i64 = np.int64
        plan.req_pool_idxs = np.fromiter((e.req.req_pool_idx for e in entries), i64, len(entries))
        plan.prefix_lens = np.fromiter((e.prefix_len for e in entries), i64, len(entries))
        plan.extend_lens = np.fromiter((e.extend_len for e in entries), i64, len(entries))
        plan.sample = np.fromiter((e.sample for e in entries), np.bool_, len(entries))
        if lora is not None:
            plan.lora_slots = np.fromiter((e.req.lora_slot for e in entries), i64, len(entries))
        if any(e.num_sample > 1 and e.sample for e in entries):
            plan.sample_counts = np.fromiter(
                (e.num_sample if e.sample else 0 for e in entries), i64, len(entries)
            )
        if any(e.ahead_drafts for e in entries):  # the slots of the drafts in flight before each such entry
            plan.ahead_drafts = np.fromiter((e.ahead_drafts for e in entries), i64, len(entries))
            plan.ahead_slots = np.concatenate(
                [e.req.kv_slots.view()[e.prefix_len - e.ahead_drafts : e.prefix_len] for e in entries]
            ).astype(i64)
        if any(e.drafts for e in entries):
            plan.draft_lens = np.fromiter((len(e.drafts) for e in entries), i64, len(entries))
            if any(e.draft_parents is not None for e in entries):  # NGRAM trees
                plan.draft_parents = np.fromiter(
                    (
                        p
                        for e in entries
                        if e.drafts
                        for p in (e.draft_parents if e.draft_parents is not None else range(len(e.drafts)))
                    ),
                    i64,
                    int(plan.draft_lens.sum()),
                )
        if grammars is not None:
            if any(e.req.grammar is not None and e.prefix_len >= e.req.num_tokens for e in entries):
                # a constrained request runs ahead: its mask follows once the token in flight is accepted
                plan.mask_deferred, self._grammars = True, grammars
            elif any(e.req.grammar is not None and e.drafts and e.drafts[0] == DRAFT_TOKEN for e in entries):
                # the runner's drafter proposes a constrained request's drafts: its rows' masks follow from them
                plan.mask_deferred = plan.drafts_deferred = True
                self._grammars = grammars
            else:
                plan.vocab_mask = grammars.masks(entries)
        plan.input_ids = np.fromiter(_input_ids(entries), i64, int(plan.extend_lens.sum()))
        plan.out_cache_loc = np.concatenate(
            [e.req.kv_slots.view()[e.prefix_len : e.prefix_len + e.extend_len] for e in entries]
        )
        plan.top_logprobs_num = np.fromiter(
            (e.req.top_logprobs_num if e.req.return_logprob else -1 for e in entries), i64, len(entries)
        )
        plan.input_logprob_start = np.fromiter(
            (e.input_lp_start - 1 - e.prefix_len if e.input_lp_count else -1 for e in entries),
            i64,
            len(entries),
        )
        plan.input_logprob_counts = np.fromiter((e.input_lp_count for e in entries), i64, len(entries))
        if plan.input_logprob_counts.any():
            plan.input_logprob_targets = np.array(
                [
                    t
                    for e in entries
                    if e.input_lp_count
                    for t in e.req.model_prompt_ids[e.input_lp_start : e.input_logprob_end]
                ],
                dtype=i64,
            )
        return self

    def deferred_mask(self) -> np.ndarray | None:
        """The token masks of a plan launched with ``mask_deferred``: call once the steps before it have been
        processed (their tokens accepted by the grammars)."""
        assert self._grammars is not None, "this batch's masks were not deferred"
        return self._grammars.masks(self.entries)

    def draft_masks(self, drafts: StepDrafts) -> np.ndarray | None:
        """The token masks of a plan launched with ``drafts_deferred``, from what the runner's drafter proposed:
        each constrained verify entry's rows under the grammar after the drafts before them
        (:meth:`GrammarTracker.verify_masks`), every other row as usual."""
        grammars = self._grammars
        assert grammars is not None and self.plan.drafts_deferred, "this batch's masks do not wait for drafts"
        verify = [e for e in self.entries if e.drafts]  # the drafts' rows, in batch order
        assert len(verify) == len(drafts.tokens), (len(verify), drafts.tokens.shape)
        for j, e in enumerate(verify):
            if e.req.grammar is None or e.drafts[0] != DRAFT_TOKEN:
                continue
            n = len(e.drafts)
            parents = drafts.parents[j, :n] if drafts.parents is not None else None
            e.row_masks = grammars.verify_masks(e.req, drafts.tokens[j, :n], parents)
        return grammars.masks(self.entries)

    @property
    def worth_running(self) -> bool:
        """Whether the plan does anything (a plan with no requests may still free request slots)."""
        return bool(self.entries or self.plan.freed_req_pool_idxs or self.plan.lora_loads)

    def iter_results(self, result: StepOutput) -> Iterator[tuple[BatchEntry, Sampled | None]]:
        s = 0
        lp = 0
        for i, e in enumerate(self.entries):
            r = e.req
            r.inflight_tokens -= e.extend_len
            r.inflight_samples -= e.sample
            r.inflight_drafts -= len(e.drafts)
            r.in_flight = r.inflight_tokens > 0
            if e.input_lp_count and result.input_logprobs is not None:
                e.input_logprobs = result.input_logprobs[lp : lp + e.input_lp_count].tolist()
                if result.input_top_ids is not None and result.input_top_vals is not None:
                    ids = result.input_top_ids[lp : lp + e.input_lp_count].tolist()
                    vals = result.input_top_vals[lp : lp + e.input_lp_count].tolist()
                    e.input_top = [list(zip(v, i, strict=True)) for v, i in zip(vals, ids, strict=True)]
                lp += e.input_lp_count
            if not e.sample:
                yield e, None
                continue
            if e.spec:
                e.rows = (s, s + e.num_sample)
                if e.drafts and result.spec_emitted is not None:
                    e.num_emitted = int(result.spec_emitted[i])
                e.row_tokens = result.next_token_ids[s : s + e.num_emitted].tolist()
                s += e.num_emitted - 1  # the row of its last emitted token
            elif e.num_sample > 1:
                e.row_tokens = result.next_token_ids[s : s + e.num_sample].tolist()
                s += e.num_sample - 1
            token = int(result.next_token_ids[s])
            logprob = float(result.logprobs[s]) if result.logprobs is not None else None
            top_ids = result.top_ids[s] if result.top_ids is not None else None
            top_vals = result.top_vals[s] if result.top_vals is not None else None
            s = e.rows[1] if e.spec else s + 1
            yield e, (token, logprob, top_ids, top_vals)


def _input_ids(entries: list[BatchEntry]) -> Iterator[int]:
    for e in entries:
        r = e.req
        if e.drafts:  # a verify chunk: the last token (still in flight: the runner's), then the drafts
            yield FUTURE_TOKEN if e.prefix_len >= r.num_tokens else r.output_ids[-1]
            yield from e.drafts
        elif e.extend_len == 1:
            pos = e.prefix_len
            n_prompt = len(r.prompt_ids)
            if pos >= r.num_tokens:  # sampled by a step still in flight: the runner substitutes it
                yield FUTURE_TOKEN
            else:
                yield r.prompt_ids[pos] if pos < n_prompt else r.output_ids[pos - n_prompt]
        else:
            yield from r.fill_ids[e.prefix_len : e.prefix_len + e.extend_len]


def _new_request(req: Req) -> NewRequest:
    p = req.sampling
    return NewRequest(
        req_pool_idx=req.req_pool_idx,
        sampling=p,
        seed=req.seed,
        eos_token_ids=[] if p.ignore_eos else list(req.eos_token_ids),
        prompt_ids=list(req.model_prompt_ids) if p.repetition_penalty != 1.0 else [],
        output_ids=list(req.output_ids),
        multimodal=req.multimodal,
    )
