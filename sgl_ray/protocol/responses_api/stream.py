"""Engine outputs → the Responses API stream events of one response (its items are those of
:mod:`sgl_ray.protocol.responses_api.output`, sent as they are parsed).

Stream order (``sequence_number`` counts every event from 0)::

    response.created, response.in_progress
    per item:  response.output_item.added
               message:    response.content_part.added, response.output_text.delta…,
                           response.output_text.done, response.content_part.done
               reasoning:  the same with reasoning_text
               call:       response.function_call_arguments.delta…, response.function_call_arguments.done
               response.output_item.done
    response.completed  (response.incomplete when cut by max_output_tokens, response.failed when aborted)

Invariant: one item is open at a time; the items and texts of the last event's response equal what
:class:`~sgl_ray.protocol.responses_api.output.ResponseBuilder` builds from the same outputs, as long as every call is complete and valid (the chat
path's streaming invariant) and no text follows a call (streamed, such text opens a second message item).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from msgspec import UNSET

from sgl_ray.protocol.chat_parsing import ChoiceParser, ChoicePieces, OutputParsing
from sgl_ray.protocol.responses import SSEFraming
from sgl_ray.protocol.responses_api.objects import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    FunctionCallItem,
    ItemEvent,
    MessageItem,
    OutputItem,
    OutputText,
    PartEvent,
    ReasoningItem,
    ReasoningText,
    ResponseEvent,
    TextDeltaEvent,
    TextDoneEvent,
    error_event,
    new_item_id,
    sse,
)
from sgl_ray.protocol.responses_api.output import ResponseChoice, ResponseDraft, response_status

if TYPE_CHECKING:
    from sgl_ray.scheduler.output import RequestOutput

_FINAL_EVENT = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
}


@dataclass
class _OpenItem:
    kind: str  # "reasoning", "message" or "call"
    output_index: int
    item_id: str
    text: str = ""  # the text, or the call's arguments so far
    name: str = ""
    call_id: str = ""
    call_index: int = -1


class ResponseStreamAssembler(ResponseChoice):
    """Turns engine outputs into Responses API stream events (encode each with :meth:`framing`).

    Example::

        >>> asm = ResponseStreamAssembler(ResponseDraft(req, model="m"), parsing)  # doctest: +SKIP
        >>> events = asm.start() + [e for i, out in engine_outputs for e in asm.add(i, out)] + asm.finish()  # doctest: +SKIP
    """

    def __init__(self, draft: ResponseDraft, parsing: OutputParsing | None = None) -> None:
        super().__init__(draft, parsing)
        self._parser: ChoiceParser | None = self.parsing.new_choice() if self.parsing is not None else None
        self._seq = 0
        self._items: list[OutputItem] = []
        self._open: _OpenItem | None = None

    def framing(self) -> SSEFraming:
        """Events as named SSE events; an error event carries the next sequence number; no ``[DONE]``."""
        return SSEFraming(sse, lambda err: sse(error_event(err, self._next())), b"")

    def _next(self) -> int:
        self._seq += 1
        return self._seq - 1

    def start(self) -> list[Any]:
        response = self.draft.response("in_progress", [])
        return [
            ResponseEvent(type="response.created", sequence_number=self._next(), response=response),
            ResponseEvent(type="response.in_progress", sequence_number=self._next(), response=response),
        ]

    def add(self, index: int, out: RequestOutput) -> list[Any]:
        self._absorb(index, out)
        if self._parser is None:
            pieces = ChoicePieces("", out.text, [])
        else:
            pieces = self._parser.feed(out.text)
            if out.finished:
                tail = self._parser.flush()
                pieces = ChoicePieces(
                    pieces.reasoning + tail.reasoning,
                    pieces.content + tail.content,
                    pieces.calls + tail.calls,
                )
        self._tokens.saw(out, bool(pieces.content or pieces.calls))
        events: list[Any] = []
        if pieces.reasoning:
            events += self._append("reasoning", pieces.reasoning)
        calls = list(pieces.calls)
        # arguments of the open call first: text in the same output comes after the call
        while calls and calls[0].name is None and self._is_open_call(calls[0].index):
            events += self._arguments(calls.pop(0).arguments)
        if pieces.content:
            events += self._append("message", pieces.content)
        for piece in calls:
            if piece.name is not None:
                events += self._open_call(piece.index, piece.name)
            if piece.arguments and self._is_open_call(piece.index):
                events += self._arguments(piece.arguments)
        return events

    def finish(self) -> list[Any]:
        """The closing events: the open item's, an empty message when there was no output, the final event."""
        status = response_status(self.finish_reason)
        item_status = "completed" if status == "completed" else "incomplete"
        events: list[Any] = []
        if not self._items and self._open is None:  # an empty answer is still a message
            events += self._append("message", "")
        events += self._close(item_status)
        has_reasoning = any(isinstance(item, ReasoningItem) for item in self._items)
        response = self.draft.response(status, self._items, self.usage(has_reasoning), self.finish_reason)
        events.append(
            ResponseEvent(type=_FINAL_EVENT[status], sequence_number=self._next(), response=response)
        )
        return events

    # --- items ---------------------------------------------------------------------------------------------------
    def _is_open_call(self, call_index: int) -> bool:
        return self._open is not None and self._open.kind == "call" and self._open.call_index == call_index

    def _append(self, kind: str, text: str) -> list[Any]:
        events: list[Any] = []
        if self._open is None or self._open.kind != kind:
            events += self._close("completed")
            item_id = new_item_id("msg" if kind == "message" else "rs")
            self._open = _OpenItem(kind, len(self._items), item_id)
            if kind == "message":
                item: OutputItem = MessageItem(id=item_id, status="in_progress")
                part: OutputText | ReasoningText = OutputText(text="")
            else:
                item, part = ReasoningItem(id=item_id, status="in_progress"), ReasoningText(text="")
            events.append(self._item_event("response.output_item.added", self._open.output_index, item))
            events.append(self._part_event("response.content_part.added", self._open, part))
        if text:
            op = self._open
            op.text += text
            message = kind == "message"
            events.append(
                TextDeltaEvent(
                    type="response.output_text.delta" if message else "response.reasoning_text.delta",
                    sequence_number=self._next(),
                    item_id=op.item_id,
                    output_index=op.output_index,
                    content_index=0,
                    delta=text,
                    logprobs=[] if message else UNSET,
                )
            )
        return events

    def _item_event(self, kind: str, output_index: int, item: OutputItem) -> ItemEvent:
        return ItemEvent(type=kind, sequence_number=self._next(), output_index=output_index, item=item)

    def _part_event(self, kind: str, op: _OpenItem, part: OutputText | ReasoningText) -> PartEvent:
        return PartEvent(
            type=kind,
            sequence_number=self._next(),
            item_id=op.item_id,
            output_index=op.output_index,
            content_index=0,
            part=part,
        )

    def _open_call(self, call_index: int, name: str) -> list[Any]:
        events = self._close("completed")
        assert self._parser is not None
        call_id = self._parser.call_id(call_index)
        op = _OpenItem(
            "call", len(self._items), new_item_id("fc"), name=name, call_id=call_id, call_index=call_index
        )
        self._open = op
        item = FunctionCallItem(
            id=op.item_id, call_id=op.call_id, name=name, arguments="", status="in_progress"
        )
        events.append(self._item_event("response.output_item.added", op.output_index, item))
        return events

    def _arguments(self, delta: str) -> list[Any]:
        op = self._open
        assert op is not None
        op.text += delta
        return [
            ArgumentsDeltaEvent(
                sequence_number=self._next(), item_id=op.item_id, output_index=op.output_index, delta=delta
            )
        ]

    def _close(self, status: str) -> list[Any]:
        """The events that finish the open item (none if none is open)."""
        op, self._open = self._open, None
        if op is None:
            return []
        events: list[Any] = []
        where = {"item_id": op.item_id, "output_index": op.output_index}
        if op.kind == "call":
            events.append(
                ArgumentsDoneEvent(sequence_number=self._next(), name=op.name, arguments=op.text, **where)
            )
            item: OutputItem = FunctionCallItem(
                id=op.item_id, call_id=op.call_id, name=op.name, arguments=op.text, status=status
            )
        else:
            message = op.kind == "message"
            part: OutputText | ReasoningText = (
                OutputText(text=op.text) if message else ReasoningText(text=op.text)
            )
            events.append(
                TextDoneEvent(
                    type="response.output_text.done" if message else "response.reasoning_text.done",
                    sequence_number=self._next(),
                    content_index=0,
                    text=op.text,
                    logprobs=[] if message else UNSET,
                    **where,
                )
            )
            events.append(self._part_event("response.content_part.done", op, part))
            if message:
                item = MessageItem(id=op.item_id, status=status, content=[OutputText(text=op.text)])
            else:
                item = ReasoningItem(id=op.item_id, status=status, content=[ReasoningText(text=op.text)])
        events.append(self._item_event("response.output_item.done", op.output_index, item))
        self._items.append(item)
        return events
