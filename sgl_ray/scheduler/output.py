"""Turns sampled tokens into what callers see: text deltas, stop handling, finish reasons, logprobs."""

from __future__ import annotations

from typing import Any

import msgspec

from sgl_ray.scheduler.request import FinishReason, Req
from sgl_ray.tokenizer.detokenizer import IncrementalDetokenizer
from sgl_ray.tokenizer.stop import StopChecker

Logprob = tuple[float | None, int]


class RequestOutput(msgspec.Struct, kw_only=True):
    """What one step added to one request. ``token_ids``/``text`` and the logprob lists are deltas."""

    rid: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    decode_steps: int = 0  # forward steps that produced this request's tokens so far
    jump_forward_tokens: int = 0  # tokens a grammar forced, appended without a decode step each
    spec_verify_ct: int | None = None  # speculative decoding (None: off): verify steps so far
    spec_proposed_drafts: int = 0
    spec_accepted_drafts: int = 0
    output_logprobs: list[Logprob] | None = None
    output_top_logprobs: list[list[Logprob]] | None = None
    input_logprobs: list[Logprob] | None = None
    input_top_logprobs: list[list[Logprob]] | None = None


class _TextState:
    __slots__ = ("detok", "stop")

    def __init__(self, req: Req, tokenizer: Any, already_emitted: list[int]) -> None:
        """``already_emitted``: output tokens whose text the caller already has (a request resumed in a new
        scheduler); they prime the detokenizer and stop checker without being emitted again."""
        p = req.sampling
        self.detok = IncrementalDetokenizer(
            tokenizer,
            prompt_ids=req.model_prompt_ids,
            skip_special_tokens=p.skip_special_tokens,
            spaces_between_special_tokens=p.spaces_between_special_tokens,
        )
        self.stop = StopChecker(p.stop, no_stop_trim=p.no_stop_trim, stop_regexes=p.stop_regex)
        if already_emitted:
            self.stop.feed(self.detok.step(already_emitted))


class OutputProcessor:
    """Keeps the per-request detokenizer and stop-string state; decides finish reasons."""

    def __init__(self, tokenizer: Any | None, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self._text: dict[str, _TextState] = {}

    def check_token_finish(self, req: Req, token: int) -> FinishReason | None:
        """Finish reasons decided by the token itself or by lengths (stop strings are checked on the text)."""
        p = req.sampling
        if p.stop_token_ids and token in p.stop_token_ids:
            return FinishReason("stop", matched=token)
        if not p.ignore_eos and token in req.eos_token_ids:
            return FinishReason("stop", matched=token)
        if len(req.output_ids) >= p.max_new_tokens:
            return FinishReason("length", matched=len(req.output_ids))
        if req.num_tokens >= self.context_length:
            return FinishReason("length", matched=len(req.output_ids))
        return None

    def text_delta(
        self, req: Req, new_tokens: list[int], finish: FinishReason | None
    ) -> tuple[str, FinishReason | None]:
        """Detokenize ``new_tokens`` (a stop/EOS token that ended the request is not rendered) and apply stop
        strings. Returns the text to emit and the (possibly new) finish reason."""
        if self.tokenizer is None:
            return "", finish
        state = self._text.get(req.rid)
        if state is None:
            emitted = req.output_ids[: len(req.output_ids) - len(new_tokens)]
            state = self._text[req.rid] = _TextState(req, self.tokenizer, emitted)
        render = new_tokens[:-1] if finish is not None and finish.type == "stop" else new_tokens
        delta = state.detok.step(render) if render else ""
        if finish is not None:
            delta += state.detok.flush()
        emit, stopped = state.stop.feed(delta)
        if stopped:
            finish = FinishReason("stop", matched=state.stop.matched)
        elif finish is not None:
            emit += state.stop.flush()
        return emit, finish

    def forget(self, rid: str) -> None:
        self._text.pop(rid, None)
