"""Step results: what the scheduler does with a step's sampled tokens (mixed into ``Scheduler``).

Per request of the batch: count the computed tokens, settle jump-forward tokens, append the sampled one, check
stop conditions and the grammar, emit the text delta, finish or cache, and let the grammar jump forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgl_ray.scheduler.batch import ScheduledBatch
from sgl_ray.scheduler.output import OutputProcessor, RequestOutput
from sgl_ray.scheduler.plan import StepOutput
from sgl_ray.scheduler.request import FinishReason, Req, ReqStatus

if TYPE_CHECKING:
    from sgl_ray.lora.pool import AdapterPool
    from sgl_ray.scheduler.config import SchedulerConfig
    from sgl_ray.scheduler.grammar import GrammarTracker
    from sgl_ray.scheduler.kv_manager import KVCacheManager
    from sgl_ray.scheduler.speculation import Speculation


class StepResults:
    """The result half of :class:`~sgl_ray.scheduler.scheduler.Scheduler` (which owns these attributes)."""

    config: SchedulerConfig
    kv: KVCacheManager
    lora: AdapterPool | None
    grammars: GrammarTracker
    outputs: OutputProcessor
    speculation: Speculation | None
    running: list[Req]
    _pending_outputs: list[RequestOutput]

    def _prefill_budget(self) -> int: ...

    def _release_lora(self, r: Req) -> None: ...

    def process(self, batch: ScheduledBatch, result: StepOutput) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        jumps: list[tuple[Req, int]] = []
        for entry, sampled in batch.iter_results(result):
            r = entry.req
            if r.status is not ReqStatus.RUNNING:
                continue  # aborted while the step ran
            r.num_computed += entry.extend_len
            if entry.input_logprobs:
                r.input_logprob_next = entry.input_logprob_end
            if sampled is None:
                self.kv.cache_unfinished(r)
                if entry.input_logprobs:
                    outputs.append(self._output(r, [], "", None, entry))
                continue
            token, *_ = sampled
            if r.sampling.max_new_tokens == 0:
                self.running.remove(r)
                self._finish(r, FinishReason("length", matched=0), emit=False)
                outputs.append(self._output(r, [], "", r.finish_reason, entry))
                continue
            if entry.spec:  # a speculative verify step: the drafts kept and one more token
                assert self.speculation is not None
                settled = self.speculation.settle(r, entry, result, self.kv, self.outputs)
                finish = settled.finish
                out = self._output(r, settled.tokens, settled.text, finish, entry)
                out.output_logprobs, out.output_top_logprobs = settled.logprobs, settled.top_logprobs
                outputs.append(out)
            else:
                jumped = bool(r.jump_tokens)
                tokens = self.grammars.settle(r, entry.row_tokens, self.kv) if jumped else []
                if entry.row_tokens:
                    token = entry.row_tokens[len(tokens)]  # the model's choice after the kept forced tokens
                r.output_ids.append(token)
                r.decode_steps += 1
                tokens.append(token)
                finish = self.outputs.check_token_finish(r, token)
                grammar_finish = self.grammars.accept(r, token)
                if grammar_finish is not None and (finish is None or finish.type == "length"):
                    finish = grammar_finish
                text, finish = self.outputs.text_delta(r, tokens, finish)
                if finish is None and entry.extend_len > 1 and not jumped:  # a prompt chunk: share it now
                    self.kv.cache_unfinished(r)  # (forced tokens are cached with the output, when it ends)
                if r.group is not None and not r.group.prompt_cached and r.group.leader == r.rid:
                    r.group.prompt_cached = True
                outputs.append(self._output(r, tokens, text, finish, entry, sampled))
            if finish is not None:
                self.running.remove(r)
                self._finish(r, finish, emit=False)
            elif r.grammar is not None and r.inflight_tokens:
                # its next step already runs (ahead): no jump now, but if the grammar forces a string, the
                # request waits for its next token and jumps then (that step samples the string's first token)
                r.jump_next = self.grammars.forces_string(r)
            elif r.grammar is not None:
                room = min(
                    r.remaining_new_tokens, self.config.context_length - r.num_tokens, self._prefill_budget()
                )
                r.jump_next = False
                jumps.append((r, room - 1))
        self.grammars.jump_many(jumps)  # their forced tokens' masks are filled in batches
        if self.kv.window is not None:  # after the settling: a rejected draft or forced token moved no window
            for entry in batch.entries:
                if entry.req.status is ReqStatus.RUNNING:
                    self.kv.slide(entry.req)
        return outputs

    def _output(self, r: Req, tokens: list[int], text: str, finish: FinishReason | None, entry, sampled=None):
        out = RequestOutput(
            rid=r.rid,
            token_ids=tokens,
            text=text,
            finished=finish is not None,
            finish_reason=finish.to_dict() if finish is not None else None,
            prompt_tokens=len(r.prompt_ids),
            completion_tokens=len(r.output_ids),
            cached_tokens=r.cached_tokens,
            decode_steps=r.decode_steps,
            jump_forward_tokens=r.jump_forward_tokens,
        )
        if self.speculation is not None:
            self._spec_counts(out, r)
        if r.return_logprob and not entry.spec:
            entry.fill_logprobs(out, r, sampled)
        return out

    def _finish(self, req: Req, reason: FinishReason, emit: bool) -> None:
        req.finish_reason = reason
        req.status = ReqStatus.FINISHED
        if req.req_pool_idx >= 0:
            self.kv.release(req)
        self._release_lora(req)
        if req.lora_name is not None and self.lora is not None:
            self.lora.remove_user(req.lora_name)
        group = req.group
        if group is not None and group.leader == req.rid and not group.prompt_cached:
            # A leader that got through its prompt left it in the cache; one that did not hands over the lead.
            if req.num_computed >= len(req.prompt_ids):
                group.prompt_cached = True
            else:
                group.leader = None
        self.outputs.forget(req.rid)
        if emit:
            self._pending_outputs.append(
                RequestOutput(
                    rid=req.rid,
                    token_ids=[],
                    text="",
                    finished=True,
                    finish_reason=reason.to_dict(),
                    prompt_tokens=len(req.prompt_ids),
                    completion_tokens=len(req.output_ids),
                    cached_tokens=req.cached_tokens,
                    decode_steps=req.decode_steps,
                    jump_forward_tokens=req.jump_forward_tokens,
                )
            )
            if self.speculation is not None:
                self._spec_counts(self._pending_outputs[-1], req)

    @staticmethod
    def _spec_counts(out: RequestOutput, r: Req) -> None:
        out.spec_verify_ct = r.spec_verify_ct
        out.spec_proposed_drafts = r.spec_proposed_drafts
        out.spec_accepted_drafts = r.spec_accepted_drafts
