"""Engine outputs → a Responses API response object (what streamed and whole responses share, and the whole one).

The output text of the one choice is split by the chat path's parsers (:mod:`sgl_ray.protocol.chat_parsing`) into
reasoning, content and calls, which become the ``output`` items in that order: ``reasoning`` (if any), ``message``
(if there is content, or nothing else), then one ``function_call`` per call. The stream of the same response is
:class:`~sgl_ray.protocol.responses_api.stream.ResponseStreamAssembler`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from sgl_ray.protocol.chat_parsing import OutputParsing, ParsedChoice
from sgl_ray.protocol.choices import UsageTracker
from sgl_ray.protocol.responses import now, openai_finish_reason
from sgl_ray.protocol.responses_api.objects import (
    RESPONSE_ID_PREFIX,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputItem,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    ResponseError,
    ResponseObject,
    ResponseUsage,
    new_item_id,
)
from sgl_ray.protocol.responses_api.request import ResponsesRequest

if TYPE_CHECKING:
    from sgl_ray.scheduler.output import RequestOutput


class ResponseDraft:
    """A response's id, creation time and the request fields it echoes; :meth:`response` fills in the rest."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.id = new_item_id(RESPONSE_ID_PREFIX)
        self.created_at = now()
        fmt = req.text.format if req.text is not None else None
        self._echo: dict[str, Any] = {
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": dict(req.metadata or {}),
            "model": model,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "reasoning": req.reasoning,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": msgspec.to_builtins(fmt) if fmt is not None else {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": list(req.tools or []),
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "user": req.user,
        }

    def response(
        self,
        status: str,
        output: list[OutputItem],
        usage: ResponseUsage | None = None,
        finish_reason: str | None = None,
    ) -> ResponseObject:
        incomplete = IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
        error = None
        if status == "failed":
            error = ResponseError(code="server_error", message=f"The response ended early ({finish_reason}).")
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            error=error,
            incomplete_details=incomplete,
            output=list(output),
            usage=usage,
            **self._echo,
        )


def response_status(finish_reason: str | None) -> str:
    """``completed``; ``incomplete`` when cut by the token limit; ``failed`` when aborted."""
    return {"length": "incomplete", "abort": "failed"}.get(finish_reason or "stop", "completed")


class _ReasoningTokens:
    """Counts the output tokens before the answer starts (the reasoning, its markers included)."""

    def __init__(self) -> None:
        self.count = 0
        self.answering = False

    def saw(self, out: RequestOutput, answered: bool) -> None:
        if answered:
            self.answering = True
        if not self.answering:
            self.count += len(out.token_ids)


class ResponseChoice:
    """What the whole and the streamed response share: usage, the finish reason, the reasoning-token count."""

    def __init__(self, draft: ResponseDraft, parsing: OutputParsing | None) -> None:
        self.draft = draft
        self.parsing = parsing if parsing is not None and parsing.active else None
        self._usage = UsageTracker(1)
        self._tokens = _ReasoningTokens()
        self.finish_reason: str | None = None

    def _absorb(self, index: int, out: RequestOutput) -> None:
        if index != 0:
            raise ValueError(f"a response has one choice, got an output for choice {index}")
        self._usage.update(index, out)
        if out.finished:
            self.finish_reason = openai_finish_reason(out.finish_reason)

    def usage(self, has_reasoning: bool) -> ResponseUsage:
        u = self._usage.usage()
        details = u.prompt_tokens_details
        return ResponseUsage(
            input_tokens=u.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=details.cached_tokens if details else 0),
            output_tokens=u.completion_tokens,
            output_tokens_details=OutputTokensDetails(
                reasoning_tokens=self._tokens.count if has_reasoning else 0
            ),
            total_tokens=u.total_tokens,
        )


class ResponseBuilder(ResponseChoice):
    """Accumulates engine outputs into one response object.

    Example::

        >>> builder = ResponseBuilder(ResponseDraft(req, model="m"), parsing)  # doctest: +SKIP
        >>> for index, out in engine_outputs:  # doctest: +SKIP
        ...     builder.add(index, out)
        >>> body = encode(builder.build())  # doctest: +SKIP
    """

    def __init__(self, draft: ResponseDraft, parsing: OutputParsing | None = None) -> None:
        super().__init__(draft, parsing)
        self._text: list[str] = []
        reasoning = self.parsing.reasoning if self.parsing is not None else None
        self._split = reasoning() if reasoning is not None else None

    def add(self, index: int, out: RequestOutput) -> None:
        self._absorb(index, out)
        self._text.append(out.text)
        self._tokens.saw(out, self._split is None or bool(self._split.feed(out.text).content))

    def build(self) -> ResponseObject:
        text = "".join(self._text)
        parser = self.parsing.new_choice() if self.parsing is not None else None
        parsed = parser.parse(text) if parser is not None else ParsedChoice(None, text, [])
        items: list[OutputItem] = []
        if parsed.reasoning:
            items.append(ReasoningItem(id=new_item_id("rs"), content=[ReasoningText(text=parsed.reasoning)]))
        if parsed.content or not parsed.calls:
            items.append(
                MessageItem(
                    id=new_item_id("msg"), status="completed", content=[OutputText(text=parsed.content)]
                )
            )
        for k, call in enumerate(parsed.calls):
            assert parser is not None
            call_id = parser.call_id(k)
            items.append(
                FunctionCallItem(
                    id=new_item_id("fc"),
                    call_id=call_id,
                    name=call.name,
                    arguments=call.arguments,
                    status="completed",
                )
            )
        status = response_status(self.finish_reason)
        if status != "completed":
            items[-1] = msgspec.structs.replace(items[-1], status="incomplete")
        return self.draft.response(status, items, self.usage(bool(parsed.reasoning)), self.finish_reason)
