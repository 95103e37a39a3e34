"""Continuous-batching scheduler: admission, chunked prefill, mixed batches, preemption by recompute.

Each step (``schedule`` → runner ``execute`` → ``process``):

1. Running requests that are decoding get one KV slot each. If the pool (after evicting cached prefixes) cannot
   provide them, the lowest-priority, most recently admitted request is preempted: its computed prefix goes to the
   prefix cache, it returns to the front of the waiting queue and later resumes from prompt + tokens generated so
   far (so nothing is lost; with the prefix cache on, most of its KV is usually still there).
2. Running requests still in prefill continue with their next chunk (``chunked_prefill_size`` tokens per step
   across all prefills).
3. Waiting requests are admitted in policy order while request slots, the prefill budget and KV memory last.
   A request whose next uncached 32-token block is being prefilled by another request waits for that request to
   cache it (in-batch prefix sharing), instead of computing the same prefix twice.
   Memory admission keeps a reserve for the decode tokens running requests will still need
   (``min(remaining, 4096) * new_token_ratio`` each); the ratio decays while there is no preemption and resets
   after one.

The plan lists decode requests first, then prefill chunks; a batch may mix both.

Overlap scheduling (``SchedulerConfig.overlap``): the engine builds step N+1 while step N runs on the device. A
request whose step N samples a token gets its next decode step in N+1 with a placeholder input token
(``plan.FUTURE_TOKEN``) that the runner fills from step N's result. If step N's token ends the request (EOS, a stop
string), the result of its extra step is dropped and its slot returned; a device runs steps in order, so the freed
KV slot is not reused before that step has written it.

Structured outputs (see ``scheduler.grammar``): a constrained request is admitted once its grammar has compiled on
a worker thread (until then it just waits in the queue); its sampled rows carry the grammar's token mask, and
tokens a grammar forces are appended by jump-forward and verified in the next extend step.

Speculative decoding (``SchedulerConfig.speculative``; see ``scheduler.speculation``): a speculating request's
decode step also verifies the drafts proposed for it, with one KV slot per draft. When the pool cannot hold every
decoding request's drafts, the step decodes without them (and preempts only if even that does not fit).
"""

from __future__ import annotations

import itertools

import numpy as np

from sgl_ray.errors import InvalidRequestError, StepLostError
from sgl_ray.lora.pool import AdapterPool
from sgl_ray.scheduler.batch import ScheduledBatch
from sgl_ray.scheduler.config import SchedulerConfig
from sgl_ray.scheduler.grammar import GrammarTracker
from sgl_ray.scheduler.kv_manager import KVCacheManager
from sgl_ray.scheduler.output import OutputProcessor, RequestOutput
from sgl_ray.scheduler.plan import StepOutput
from sgl_ray.scheduler.policy import create_policy
from sgl_ray.scheduler.request import FinishReason, Req, ReqStatus
from sgl_ray.scheduler.results import StepResults
from sgl_ray.scheduler.speculation import Speculation

_CLIP_NEW_TOKENS = 4096
_PREFIX_BLOCK = 32  # granularity at which waiting prompts are compared with prompts being prefilled


class Scheduler(StepResults):
    """Example::

    >>> sched = Scheduler(SchedulerConfig(num_slots=4096, max_reqs=64, context_length=2048), tokenizer)
    >>> sched.add_request(req)  # doctest: +SKIP
    >>> outputs = sched.step(runner.execute)  # doctest: +SKIP
    """

    def __init__(self, config: SchedulerConfig, tokenizer: object | None = None) -> None:
        self.config = config
        self.kv = KVCacheManager(
            config.num_slots,
            config.page_size,
            config.max_reqs,
            config.enable_prefix_cache,
            config.kv_window,
            config.kv_swa_slots,
        )
        self.policy = create_policy(config.policy)
        self.lora = AdapterPool(config.max_loras_per_batch) if config.max_loras_per_batch else None
        self.outputs = OutputProcessor(tokenizer, config.context_length)
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.new_token_ratio = config.init_new_token_ratio
        self._step_ids = itertools.count(1)
        self._admit_seq = itertools.count()
        self._pending_outputs: list[RequestOutput] = []
        self._decode_share = 1
        self.num_preemptions = 0
        self._prefill_turn = True  # without mixed chunks: whether the next step tries prefills first
        self.num_deferred_mask_steps = 0  # steps of constrained requests planned before their masks existed
        vocab = config.vocab_size or (len(tokenizer) if tokenizer is not None else 0)  # type: ignore[arg-type]
        self.grammars = GrammarTracker(
            tokenizer,
            vocab,
            config.grammar_backend,
            config.enable_jump_forward,
            compile_timeout_s=config.grammar_compile_timeout,
        )
        self._rejected: list[tuple[str, InvalidRequestError]] = []
        self.speculation = (
            Speculation(config.speculative, config.context_length, self.grammars)
            if config.speculative is not None
            else None
        )

    # --- requests in and out -----------------------------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        """Queue a request. Raises :class:`InvalidRequestError` if it can never run here."""
        if not req.prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(req.prompt_ids) >= self.config.context_length:
            raise InvalidRequestError(
                f"the prompt has {len(req.prompt_ids)} tokens; this model's context length is "
                f"{self.config.context_length} (prompt + at least one new token must fit)",
                param="prompt",
                code="context_length_exceeded",
            )
        if self.kv.slots_to_run(len(req.prompt_ids) + 1, self.config.chunked_prefill_size) > self.kv.capacity:
            raise InvalidRequestError(
                f"the prompt has {len(req.prompt_ids)} tokens but the KV cache holds {self.kv.capacity}",
                param="prompt",
            )
        if req.lora_name is not None:
            if self.lora is None:
                raise InvalidRequestError(
                    "LoRA is not enabled on this engine (enable_lora)", param="lora_path"
                )
            self.lora.add_user(req.lora_name)
        self.grammars.start(req)
        req.status = ReqStatus.WAITING
        self.waiting.append(req)

    def take_rejections(self) -> list[tuple[str, InvalidRequestError]]:
        """Requests dropped before admission (their grammar failed to compile), with the error to give them."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def abort(self, rid: str, message: str = "aborted") -> bool:
        """Stop a waiting or running request now, freeing its KV. Returns whether it was found."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    self._finish(req, FinishReason("abort", message=message), emit=True)
                    return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending_outputs)

    def flush_cache(self) -> bool:
        """Drop the prefix cache; refused (False) while requests are running."""
        return not self.running and self.kv.flush()

    # --- one step ------------------------------------------------------------------------------------------------
    def step(self, execute) -> list[RequestOutput]:
        """Schedule, run and process one batch synchronously."""
        batch = self.schedule()
        try:
            result = execute(batch.plan)
        except StepLostError:
            return self.lose_in_flight()
        return self.process(batch, result)

    def lose_in_flight(self) -> list[RequestOutput]:
        """Every batch in flight was lost with the shards' KV: resume their requests from their tokens."""
        self.reset_kv()
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def take_pending_outputs(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def reset_kv(self) -> None:
        """The shards' KV is gone (rebuilt after a failure): forget all KV metadata and send every running
        request back to the front of the queue; each resumes from prompt + the tokens it already generated."""
        c = self.config
        self.kv = KVCacheManager(
            c.num_slots, c.page_size, c.max_reqs, c.enable_prefix_cache, c.kv_window, c.kv_swa_slots
        )
        if self.lora is not None:
            self.lora.reset_slots()
        resumed = sorted(self.running, key=lambda r: r.admit_seq)
        for r in resumed + self.waiting:
            r.in_flight, r.inflight_tokens, r.inflight_samples, r.inflight_drafts = False, 0, 0, 0
            r.kv_slots.clear()
            r.req_pool_idx, r.cache_node, r.tree_len, r.num_computed = -1, None, 0, 0
            r.lora_slot = -1
            r.status = ReqStatus.WAITING
            if r.group is not None and not r.group.prompt_cached:
                r.group.leader = None
        for r in resumed:
            r.num_retractions += 1
            self.grammars.unjump(r)
        self.running = []
        self.waiting = resumed + self.waiting
        self.num_preemptions += len(resumed)

    def schedule(self, max_in_flight: int = 1) -> ScheduledBatch:
        """Build the next batch from requests not already in flight. With ``max_in_flight`` > 1 (pipeline
        micro-batches) each batch takes about 1/max_in_flight of the decoding requests, so the batches in
        flight together cover them all."""
        self._decode_share = max_in_flight
        batch = ScheduledBatch(next(self._step_ids))
        if self.config.mixed_chunks:
            retracted = self._schedule_decodes(batch)
            self._schedule_prefills(batch, retracted)
        elif self._prefill_turn:  # one kind per step, taking turns: decode steps stay CUDA-graph shaped
            retracted = False
            self._schedule_prefills(batch, retracted)
            if not batch.entries:
                retracted = self._schedule_decodes(batch)
        else:
            retracted = self._schedule_decodes(batch)
            if not batch.entries:
                self._schedule_prefills(batch, retracted)
        self._prefill_turn = batch.num_prefill_tokens == 0
        if not retracted:
            self.new_token_ratio = max(
                self.config.min_new_token_ratio, self.new_token_ratio - self.config.new_token_ratio_decay
            )
        batch.finalize(self.kv, self.lora, self.grammars)
        self.num_deferred_mask_steps += batch.plan.mask_deferred and not batch.plan.drafts_deferred
        return batch

    def _schedule_prefills(self, batch: ScheduledBatch, retracted: bool) -> None:
        """Continuing prefill chunks (jump-forward extends among them), then new requests unless a request was
        just preempted."""
        budget = self._schedule_prefill_chunks(batch)
        if not retracted:
            self._admit(batch, budget)

    def _schedule_decodes(self, batch: ScheduledBatch) -> bool:
        ahead = self.config.overlap
        decoding = [
            r
            for r in self.running
            if r.is_decoding and (not r.in_flight or (ahead and self._can_run_ahead(r)))
        ]
        if self._decode_share > 1:
            decoding = decoding[: -(-len(self.running) // self._decode_share)]
        if self.speculation is not None and decoding and self._schedule_verifies(batch, decoding):
            return False
        retracted = False
        while decoding and self.kv.alloc(decoding, [1] * len(decoding)) is None:
            victim = self._pick_victim()
            if victim is None:  # every candidate is in flight: wait for those batches to finish
                return retracted
            if len(self.running) == 1:
                # A lone request that no longer fits the pool: end it instead of looping.
                self.running.remove(victim)
                decoding.remove(victim)
                reason = FinishReason("abort", message="the KV cache is too small for this request")
                self._finish(victim, reason, emit=True)
                continue
            self._retract(victim)
            retracted = True
            if victim in decoding:
                decoding.remove(victim)
        if self.lora is not None:  # one contiguous run of tokens per adapter: fewer, longer LoRA segments
            decoding.sort(key=lambda r: r.lora_slot)
        for r in decoding:
            if self.speculation is not None and self.speculation.eligible(r):
                batch.add_verify(r, [])  # a verify step without drafts (counted as one)
            else:
                batch.add(r, 1)
        return retracted

    def _schedule_verifies(self, batch: ScheduledBatch, decoding: list[Req]) -> bool:
        """Decode steps with drafts for every decoding request that speculates, if the pool holds their slots
        (all or nothing). Returns whether they were scheduled."""
        assert self.speculation is not None
        if self.lora is not None:
            decoding = sorted(decoding, key=lambda r: r.lora_slot)
        proposals = [self.speculation.propose(r) for r in decoding]
        if not any(p is not None and p[0] for p in proposals):
            return False  # nothing to verify: the plain path (which can preempt)
        sizes = [1 + (len(p[0]) if p is not None else 0) for p in proposals]
        if self.kv.alloc(decoding, sizes) is None:
            return False
        for r, p in zip(decoding, proposals, strict=True):
            if p is None:
                batch.add(r, 1)
            else:
                batch.add_verify(r, *p)
        return True

    def _can_run_ahead(self, r: Req) -> bool:
        """A constrained request's mask depends on the token in flight: it runs ahead only when the mask may be
        filled after that token is accepted (``defer_grammar_masks``), and not when its grammar was forcing a
        string last time (``jump_next``): then it waits for its token so that it can jump forward. Never while
        the step in flight verifies forced tokens: rejecting some of them moves the next position back."""
        if not r.can_run_ahead or r.jump_tokens:
            return False
        spec = self.speculation
        if spec is not None:
            # Not under a grammar: a plan's masks can wait for the tokens in flight or for the runner's drafts,
            # not both. A speculating request: its drafts come from the runner's drafter, which sees the tokens
            # in flight (NGRAM's would be guesses from before them), and its next chunk fits the context even if
            # the step in flight keeps every draft.
            if r.sampling.grammar is not None:
                return False
            if spec.eligible(r):
                return (
                    spec.config.uses_draft_model
                    and r.num_tokens + r.inflight_drafts + 1 < self.config.context_length
                )
        return r.sampling.grammar is None or (
            self.config.defer_grammar_masks and not (r.jump_next and self.grammars.may_jump(r))
        )

    def _prefill_budget(self) -> int:
        chunk = self.config.chunked_prefill_size
        return min(chunk, self.config.max_prefill_tokens) if chunk else self.config.max_prefill_tokens

    def _schedule_prefill_chunks(self, batch: ScheduledBatch) -> int:
        budget = self._prefill_budget()
        cands = [r for r in self.running if not r.is_decoding and not r.in_flight and r.req_pool_idx >= 0]
        for r in sorted(cands, key=lambda r: not r.jump_tokens):  # jump-forward extends first, whole
            if r.req_pool_idx < 0:
                continue  # preempted below to make room for an earlier candidate
            remaining = r.num_tokens - r.num_computed
            n = min(remaining, budget) if self.config.chunked_prefill_size else remaining
            n = _fit_images(r, r.num_computed, n)
            if n <= 0 or (r.jump_tokens and n < remaining):
                continue
            if self.kv.alloc([r], [n]) is None:
                if batch.entries:
                    continue  # memory frees up as the scheduled requests finish; it keeps its place
                victim = self._pick_victim()
                if victim is not None and victim is not r:
                    self._retract(victim)  # nothing else can run: make room for the oldest prefill
                continue
            batch.add(r, n)
            budget -= n
        return budget

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        if not self.waiting:
            return
        chunking = self.config.chunked_prefill_size is not None
        reserve = (
            sum(min(r.remaining_new_tokens, _CLIP_NEW_TOKENS) for r in self.running) * self.new_token_ratio
        )
        admitted: list[Req] = []
        inflight = self._inflight_prefixes()
        slot_wait = False  # a request earlier in order waits for an adapter slot
        for r in self.policy.order(self.waiting, self.kv):
            if len(self.running) >= self.config.max_running_requests or budget <= 0:
                break
            try:
                if not self.grammars.ready(r):
                    continue  # its grammar is still compiling
            except InvalidRequestError as e:
                self._rejected.append((r.rid, e))
                admitted.append(r)  # leaves the queue
                r.status = ReqStatus.FINISHED
                continue
            group = r.group
            if group is not None and self.kv.cache is not None and not group.prompt_cached:
                if group.leader not in (None, r.rid):
                    continue  # let the leader cache the shared prompt first
            match = self.kv.match(r)
            if inflight is not None and self._shares_inflight_prefix(r, match, inflight):
                continue  # a request being prefilled will cache this prefix: wait for it instead of recomputing
            start = match.length if match is not None else 0
            remaining = r.num_tokens - start
            n = _fit_images(r, start, min(remaining, budget) if chunking else remaining)
            if not chunking and n > budget and batch.num_prefill_tokens > 0:
                break
            own_reserve = min(r.remaining_new_tokens, _CLIP_NEW_TOKENS) * self.new_token_ratio
            if r.lora_name is not None and slot_wait:
                continue  # let the held adapters drain, or the waiting one could starve behind them
            if not self._acquire_lora(r):
                assert self.lora is not None
                slot_wait = self.lora.can_free_slot()  # every slot is held by running requests
                continue
            # With nothing running, admit whatever fits at all (no headroom rule can deadlock an idle engine).
            if not self.kv.admit(r, match, n, reserve + own_reserve if self.running else 0.0):
                self._release_lora(r)
                break
            if r.admit_seq < 0:
                r.cached_tokens = r.num_computed
            r.admit_seq = next(self._admit_seq)
            r.status = ReqStatus.RUNNING
            if group is not None and group.leader is None:
                group.leader = r.rid
            self.running.append(r)
            admitted.append(r)
            if inflight is not None:
                inflight.update(r.prompt_block_hashes(_PREFIX_BLOCK))
            batch.add(r, n, new=True)
            budget -= n
            reserve += own_reserve
        if admitted:
            ids = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in ids]

    def _inflight_prefixes(self) -> set[int] | None:
        """Block hashes of prompts still being prefilled (None when there is no prefix cache to wait for)."""
        if self.kv.cache is None:
            return None
        out: set[int] = set()
        for r in self.running:
            if r.num_computed < len(r.prompt_ids):
                out.update(r.prompt_block_hashes(_PREFIX_BLOCK))
        return out

    @staticmethod
    def _shares_inflight_prefix(r: Req, match, inflight: set[int]) -> bool:
        """Whether the first block of ``r``'s prompt beyond its cached match is being computed by another request."""
        cached = match.length if match is not None else 0
        hashes = r.prompt_block_hashes(_PREFIX_BLOCK)
        k = cached // _PREFIX_BLOCK
        return k < len(hashes) and hashes[k] in inflight

    def _acquire_lora(self, r: Req) -> bool:
        if r.lora_name is None or r.lora_slot >= 0:
            return True
        assert self.lora is not None
        r.lora_slot = self.lora.acquire(r.lora_name)
        return r.lora_slot >= 0

    def _release_lora(self, r: Req) -> None:
        if r.lora_slot >= 0 and self.lora is not None and r.lora_name is not None:
            self.lora.release(r.lora_name)
        r.lora_slot = -1

    def _pick_victim(self) -> Req | None:
        candidates = [r for r in self.running if not r.in_flight]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.priority, -r.admit_seq))

    def _retract(self, req: Req) -> None:
        self.kv.release(req)
        self._release_lora(req)
        self.running.remove(req)
        self.grammars.unjump(req)
        req.status = ReqStatus.WAITING
        req.num_computed = 0
        req.num_retractions += 1
        if req.group is not None and req.group.leader == req.rid and not req.group.prompt_cached:
            req.group.leader = None
        self.waiting.insert(0, req)
        self.num_preemptions += 1
        self.new_token_ratio = self.config.init_new_token_ratio

    # --- results -------------------------------------------------------------------------------------------------


def empty_result(step_id: int) -> StepOutput:
    return StepOutput(step_id=step_id, next_token_ids=np.zeros(0, dtype=np.int64))


def _fit_images(r: Req, start: int, n: int) -> int:
    """A prefill chunk of ``n`` tokens from ``start``, moved to end at an image's edge when the model attends in
    both directions within images (``MultimodalInputs.whole_images``, Gemma 3): an image's tokens are computed in
    one step, seeing each other."""
    mm = r.multimodal
    if mm is None or not mm.whole_images or n <= 0:
        return n
    return mm.chunk_end(start, start + n) - start
