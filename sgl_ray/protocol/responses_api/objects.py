"""Response objects and stream events of the Responses API, in OpenAI's JSON shapes.

A response's ``output`` is a list of items: a ``reasoning`` item (when a reasoning parser split off thinking), a
``message`` item with one ``output_text`` part, and one ``function_call`` item per call (``call_id``, ``name``,
``arguments`` as JSON text). A streamed response is a sequence of events, each with its ``type`` and a
``sequence_number`` counting from 0 (see :mod:`sgl_ray.protocol.responses_api.output` for the order).
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from sgl_ray.errors import SglRayError

RESPONSE_ID_PREFIX = "resp"

_ENCODER = msgspec.json.Encoder()


def new_item_id(prefix: str) -> str:
    """``resp_…``, ``msg_…``, ``fc_…``, ``rs_…``: 32 hex digits after the prefix."""
    return f"{prefix}_{uuid.uuid4().hex}"


class _Out(msgspec.Struct, kw_only=True):
    """Base of every body here (msgspec does not inherit ``kw_only``: each subclass restates it)."""


# --- output items -------------------------------------------------------------------------------------------------
class OutputText(_Out, kw_only=True, tag="output_text", tag_field="type"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningText(_Out, kw_only=True, tag="reasoning_text", tag_field="type"):
    text: str


class MessageItem(_Out, kw_only=True, tag="message", tag_field="type"):
    id: str
    status: str  # in_progress, completed, incomplete
    role: str = "assistant"
    content: list[OutputText] = msgspec.field(default_factory=list)


class FunctionCallItem(_Out, kw_only=True, tag="function_call", tag_field="type"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


class ReasoningItem(_Out, kw_only=True, tag="reasoning", tag_field="type"):
    id: str
    summary: list[Any] = msgspec.field(default_factory=list)
    content: list[ReasoningText] = msgspec.field(default_factory=list)
    status: str = "completed"


OutputItem = MessageItem | FunctionCallItem | ReasoningItem


# --- the response ---------------------------------------------------------------------------------------------------
class InputTokensDetails(_Out, kw_only=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(_Out, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(_Out, kw_only=True):
    """``total_tokens = input_tokens + output_tokens``; ``reasoning_tokens`` counts the output tokens up to the
    end of the reasoning (the thinking markers included)."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(_Out, kw_only=True):
    reason: str  # "max_output_tokens"


class ResponseError(_Out, kw_only=True):
    code: str
    message: str


class ResponseObject(_Out, kw_only=True):
    """``object: "response"``. ``status`` is ``in_progress`` (in the first stream events), ``completed``,
    ``incomplete`` (cut by ``max_output_tokens``) or ``failed`` (aborted). ``store`` is always false: nothing is
    kept."""

    id: str
    object: str = "response"
    created_at: int
    status: str
    background: bool = False
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    model: str
    output: list[OutputItem] = msgspec.field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: dict[str, Any] | None = None
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any] = msgspec.field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = msgspec.field(default_factory=list)
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None


# --- stream events --------------------------------------------------------------------------------------------------
class ResponseEvent(_Out, kw_only=True):
    """``response.created``, ``response.in_progress``, ``response.completed``, ``response.incomplete``,
    ``response.failed``."""

    type: str
    sequence_number: int
    response: ResponseObject


class ItemEvent(_Out, kw_only=True):
    """``response.output_item.added`` / ``.done``."""

    type: str
    sequence_number: int
    output_index: int
    item: OutputItem


class PartEvent(_Out, kw_only=True):
    """``response.content_part.added`` / ``.done``."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class TextDeltaEvent(_Out, kw_only=True):
    """``response.output_text.delta`` and ``response.reasoning_text.delta`` (``logprobs`` only on the former)."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] | UnsetType = UNSET


class TextDoneEvent(_Out, kw_only=True):
    """``response.output_text.done`` and ``response.reasoning_text.done``."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] | UnsetType = UNSET


class ArgumentsDeltaEvent(_Out, kw_only=True):
    """``response.function_call_arguments.delta``."""

    type: str = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(_Out, kw_only=True):
    """``response.function_call_arguments.done``."""

    type: str = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Out, kw_only=True):
    """``error``: the stream failed after it started (its HTTP status was already 200)."""

    type: str = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None


def sse(event: Any) -> bytes:
    """One server-sent event named by its type: ``event: <type>\\ndata: <json>\\n\\n``."""
    return b"event: " + event.type.encode() + b"\ndata: " + _ENCODER.encode(event) + b"\n\n"


def error_event(err: SglRayError, sequence_number: int) -> ErrorEvent:
    return ErrorEvent(
        sequence_number=sequence_number, code=err.code or err.error_type, message=err.message, param=err.param
    )
