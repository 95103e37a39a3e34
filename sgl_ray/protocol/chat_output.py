"""Engine outputs → chat completion responses: streamed chunks or one final body.

Feed each engine output with the choice index it belongs to (an ``n > 1`` request is ``n`` engine requests;
outputs of different choices may interleave in any order).

Streaming invariants, per choice: the first chunk is ``delta: {"role": "assistant", "content": ""}``; then one
chunk per output that adds text or logprobs (``delta: {"content": ...}``); then exactly one chunk with
``delta: {}`` and the ``finish_reason``. The contents concatenate to the non-streamed ``message.content``.
With ``include_usage`` every chunk has ``"usage": null`` and :meth:`ChatStreamAssembler.finish` adds a last
chunk with ``choices: []`` and the request's usage; with ``continuous_usage`` too, every chunk carries the usage
so far instead of null. The finishing chunk of a choice, and every choice of a whole response, carry
``matched_stop``.

With ``parsing`` (tool calls, a reasoning parser; see :mod:`sgl_ray.protocol.chat_parsing`) each choice's text is
split into ``reasoning_content``, ``content`` and ``tool_calls`` deltas instead, and a choice that stopped after
calling tools finishes with ``"tool_calls"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from msgspec import UNSET

from sgl_ray.protocol.chat_parsing import ChoiceParser, ChoicePieces, OutputParsing
from sgl_ray.protocol.choices import UsageTracker, check_index, visible_logprobs
from sgl_ray.protocol.logprobs import TokenTexts, chat_logprob_entries
from sgl_ray.protocol.requests import ChatCompletionRequest
from sgl_ray.protocol.responses import (
    CHAT_ID_PREFIX,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobEntry,
    ChatLogprobs,
    FunctionCall,
    FunctionCallDelta,
    ToolCallDeltaOut,
    ToolCallOut,
    matched_stop,
    new_request_id,
    now,
    openai_finish_reason,
)

if TYPE_CHECKING:
    from sgl_ray.scheduler.output import RequestOutput

_T = TypeVar("_T", bound="_ChatChoices")


class _ChatChoices:
    """What both assemblers share: the response header, choice bookkeeping, logprob rendering."""

    def __init__(
        self,
        *,
        model: str,
        n: int = 1,
        logprobs: bool = False,
        token_texts: TokenTexts | None = None,
        request_id: str | None = None,
        created: int | None = None,
        system_fingerprint: str | None = None,
        parsing: OutputParsing | None = None,
    ) -> None:
        if logprobs and token_texts is None:
            raise ValueError("logprobs need token_texts (a TokenTexts for the model's tokenizer)")
        self.model = model
        self.n = n
        self.id = request_id or new_request_id(CHAT_ID_PREFIX)
        self.created = created if created is not None else now()
        self.system_fingerprint = system_fingerprint if system_fingerprint is not None else UNSET
        self._logprobs = logprobs
        self._texts = token_texts
        self._finished: set[int] = set()
        self._usage = UsageTracker(n)
        self._parsing = parsing if parsing is not None and parsing.active else None
        self._parsers: dict[int, ChoiceParser] = {}

    @classmethod
    def from_request(
        cls: type[_T],
        req: ChatCompletionRequest,
        *,
        model: str,
        token_texts: TokenTexts | None = None,
        **kw: Any,
    ) -> _T:
        """Configured from ``req``'s ``n`` and ``logprobs`` (and, for a stream, ``include_usage``)."""
        return cls(model=model, n=req.n or 1, logprobs=bool(req.logprobs), token_texts=token_texts, **kw)

    def _parser(self, index: int) -> ChoiceParser | None:
        if self._parsing is None:
            return None
        if index not in self._parsers:
            self._parsers[index] = self._parsing.new_choice()
        return self._parsers[index]

    @property
    def done(self) -> bool:
        """Whether every choice has finished."""
        return len(self._finished) == self.n

    def _absorb(self, index: int, out: RequestOutput) -> list[ChatLogprobEntry] | None:
        check_index(index, self.n, self._finished)
        self._usage.update(index, out)
        if out.finished:
            self._finished.add(index)
        if not self._logprobs:
            return None
        assert self._texts is not None
        lps, tops = visible_logprobs(out)
        return chat_logprob_entries(self._texts, lps, tops)


class ChatStreamAssembler(_ChatChoices):
    """Turns engine outputs into ``chat.completion.chunk`` objects (encode each with ``sse_event``).

    Example::

        >>> asm = ChatStreamAssembler(model="m", n=2, include_usage=True)
        >>> for index, out in engine_outputs:  # doctest: +SKIP
        ...     for chunk in asm.add(index, out):
        ...         yield sse_event(chunk)
        >>> for chunk in asm.finish():  # doctest: +SKIP
        ...     yield sse_event(chunk)
        >>> yield SSE_DONE  # doctest: +SKIP
    """

    def __init__(self, *, include_usage: bool = False, continuous_usage: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.include_usage = include_usage
        self.continuous_usage = include_usage and continuous_usage
        self._started: set[int] = set()

    @classmethod
    def from_request(
        cls, req: ChatCompletionRequest, *, model: str, token_texts: TokenTexts | None = None, **kw: Any
    ) -> ChatStreamAssembler:
        kw.setdefault("include_usage", req.include_usage)
        kw.setdefault("continuous_usage", req.continuous_usage)
        return super().from_request(req, model=model, token_texts=token_texts, **kw)

    def start(self) -> list[ChatCompletionChunk]:
        """The role chunks of every choice that has not had one (lets a server answer before the first token)."""
        return [self._role_chunk(i) for i in range(self.n) if i not in self._started]

    def add(self, index: int, out: RequestOutput) -> list[ChatCompletionChunk]:
        """The chunks for one engine output of choice ``index``."""
        chunks = [] if index in self._started else [self._role_chunk(index)]
        entries = self._absorb(index, out)
        logprobs = ChatLogprobs(content=entries) if entries is not None else None
        parser = self._parser(index)
        if parser is None:
            if out.text or entries:
                delta = ChatDelta(content=out.text)
                chunks.append(self._chunk(ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)))
        else:
            pieces = parser.feed(out.text)
            if out.finished:
                tail = parser.flush()
                pieces = ChoicePieces(
                    pieces.reasoning + tail.reasoning,
                    pieces.content + tail.content,
                    pieces.calls + tail.calls,
                )
            deltas = _piece_deltas(parser, pieces)
            if entries and not deltas:  # the tokens' text is held back for now: their logprobs are not
                deltas = [ChatDelta(content="")]
            for i, delta in enumerate(deltas):
                lp = logprobs if i == 0 else None
                chunks.append(self._chunk(ChatChunkChoice(index=index, delta=delta, logprobs=lp)))
        if out.finished:
            reason = _finish_reason(out, parser)
            matched = matched_stop(out.finish_reason)
            finish = ChatChunkChoice(
                index=index, delta=ChatDelta(), finish_reason=reason, matched_stop=matched
            )
            chunks.append(self._chunk(finish))
        return chunks

    def finish(self) -> list[ChatCompletionChunk]:
        """The closing chunks: the usage chunk when ``include_usage``, else nothing (then send ``SSE_DONE``)."""
        if not self.include_usage:
            return []
        return [
            ChatCompletionChunk(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[],
                system_fingerprint=self.system_fingerprint,
                usage=self._usage.usage(),
            )
        ]

    def _role_chunk(self, index: int) -> ChatCompletionChunk:
        self._started.add(index)
        return self._chunk(ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")))

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            system_fingerprint=self.system_fingerprint,
            usage=(self._usage.usage() if self.continuous_usage else None) if self.include_usage else UNSET,
        )


class ChatResponseBuilder(_ChatChoices):
    """Accumulates engine outputs into one ``chat.completion`` body.

    Example::

        >>> builder = ChatResponseBuilder(model="m")
        >>> for index, out in engine_outputs:  # doctest: +SKIP
        ...     builder.add(index, out)
        >>> body = encode(builder.build())  # doctest: +SKIP
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._text: dict[int, list[str]] = {}
        self._entries: dict[int, list[ChatLogprobEntry]] = {}
        self._reason: dict[int, str | None] = {}
        self._matched: dict[int, int | str | None] = {}

    def add(self, index: int, out: RequestOutput) -> None:
        entries = self._absorb(index, out)
        self._text.setdefault(index, []).append(out.text)
        if entries is not None:
            self._entries.setdefault(index, []).extend(entries)
        if out.finished:
            self._reason[index] = openai_finish_reason(out.finish_reason)
            self._matched[index] = matched_stop(out.finish_reason)

    def build(self) -> ChatCompletionResponse:
        """The response; choices are in index order (a choice without outputs has empty content)."""
        choices = [
            ChatChoice(
                index=i,
                message=self._message(i),
                logprobs=ChatLogprobs(content=self._entries.get(i, [])) if self._logprobs else None,
                finish_reason=self._reason.get(i),
                matched_stop=self._matched.get(i),
            )
            for i in range(self.n)
        ]
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self._usage.usage(),
            system_fingerprint=self.system_fingerprint,
        )

    def _message(self, index: int) -> AssistantMessage:
        text = "".join(self._text.get(index, []))
        parser = self._parser(index)
        if parser is None:
            return AssistantMessage(content=text)
        parsed = parser.parse(text)
        message = AssistantMessage(content=parsed.content or (None if parsed.calls else parsed.content))
        if parsed.reasoning is not None:
            message.reasoning_content = parsed.reasoning or None
        if parsed.calls:
            message.tool_calls = [
                ToolCallOut(id=parser.call_id(k), function=FunctionCall(name=c.name, arguments=c.arguments))
                for k, c in enumerate(parsed.calls)
            ]
            if self._reason.get(index) == "stop":
                self._reason[index] = "tool_calls"
        return message


def _piece_deltas(parser: ChoiceParser, pieces: ChoicePieces) -> list[ChatDelta]:
    """The deltas of one output's parsed pieces: reasoning, then content, then one per tool-call piece."""
    deltas = []
    if pieces.reasoning:
        deltas.append(ChatDelta(reasoning_content=pieces.reasoning))
    if pieces.content:
        deltas.append(ChatDelta(content=pieces.content))
    for piece in pieces.calls:
        if piece.name is not None:
            call = ToolCallDeltaOut(
                index=piece.index,
                id=parser.call_id(piece.index),
                type="function",
                function=FunctionCallDelta(name=piece.name, arguments=piece.arguments),
            )
        else:
            call = ToolCallDeltaOut(index=piece.index, function=FunctionCallDelta(arguments=piece.arguments))
        deltas.append(ChatDelta(tool_calls=[call]))
    return deltas


def _finish_reason(out: RequestOutput, parser: ChoiceParser | None) -> str | None:
    reason = openai_finish_reason(out.finish_reason)
    if reason == "stop" and parser is not None and parser.call_ids:
        return "tool_calls"
    return reason
