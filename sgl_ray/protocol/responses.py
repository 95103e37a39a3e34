"""Response bodies that encode to exactly OpenAI's JSON shapes, plus SSE framing and error bodies.

Invariants:

* Field order and names follow OpenAI's API reference; ``msgspec.UNSET`` fields are left out of the JSON
  (``system_fingerprint`` when unknown; a chunk's ``usage`` unless ``stream_options.include_usage`` asked for
  it, in which case every chunk carries ``"usage": null`` and the last one the totals, as OpenAI does).
* ``finish_reason`` is ``"stop"``, ``"length"`` or ``"abort"`` (see :func:`openai_finish_reason`), or
  ``"tool_calls"`` for a chat choice that stopped after calling tools.
* ``reasoning_content`` and ``tool_calls`` appear only where a reasoning parser or tool calling produced them.
* ``matched_stop`` (SGLang's extension) is in every choice of a whole response and in the finishing chunk of a
  stream: the stop string, stop-regex pattern or token id that ended the choice, null when it ended otherwise.
* Every body here is a ``msgspec.Struct``; :func:`encode` / :func:`sse_event` serialise any of them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import msgspec
from msgspec import UNSET, UnsetType

from sgl_ray.errors import SglRayError

CHAT_ID_PREFIX = "chatcmpl"
TOOL_CALL_ID_PREFIX = "call"
COMPLETION_ID_PREFIX = "cmpl"
SSE_DONE = b"data: [DONE]\n\n"

_ENCODER = msgspec.json.Encoder()


class _Out(msgspec.Struct, kw_only=True):
    """Base of every response body (msgspec does not inherit ``kw_only``: each subclass restates it)."""


# --- usage ----------------------------------------------------------------------------------------------------------
class PromptTokensDetails(_Out, kw_only=True):
    cached_tokens: int = 0


class Usage(_Out, kw_only=True):
    """Token counts of a whole request (all choices): ``total_tokens = prompt_tokens + completion_tokens``."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


# --- chat -----------------------------------------------------------------------------------------------------------
class TopLogprob(_Out, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprobEntry(_Out, kw_only=True):
    """One generated token: its text, logprob, UTF-8 bytes and the ``top_logprobs`` alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out, kw_only=True):
    content: list[ChatLogprobEntry] | None


class FunctionCall(_Out, kw_only=True):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCallOut(_Out, kw_only=True):
    """One call in ``message.tool_calls``."""

    id: str
    type: str = "function"
    function: FunctionCall


class AssistantMessage(_Out, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None | UnsetType = UNSET
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


Matched = int | str | None | UnsetType


class ChatChoice(_Out, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: Matched = UNSET


class ChatCompletionResponse(_Out, kw_only=True):
    """``POST /v1/chat/completions`` without streaming."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | UnsetType = UNSET


class FunctionCallDelta(_Out, kw_only=True):
    name: str | UnsetType = UNSET
    arguments: str = ""


class ToolCallDeltaOut(_Out, kw_only=True):
    """A piece of call ``index``: the first has ``id``, ``type`` and ``function.name``, later ones add
    ``function.arguments`` text."""

    index: int
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET
    function: FunctionCallDelta


class ChatDelta(_Out, kw_only=True):
    """A chunk's ``delta``: ``{"role": "assistant", "content": ""}`` first, then ``{"content": ...}`` (or
    ``{"reasoning_content": ...}``, or ``{"tool_calls": [...]}``), then ``{}`` beside the ``finish_reason``."""

    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDeltaOut] | UnsetType = UNSET


class ChatChunkChoice(_Out, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: Matched = UNSET


class ChatCompletionChunk(_Out, kw_only=True):
    """One ``data:`` event of a streamed chat completion (``choices`` is empty in the usage chunk)."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | UnsetType = UNSET
    usage: Usage | None | UnsetType = UNSET


# --- completions ----------------------------------------------------------------------------------------------------
class PromptLogprob(_Out, kw_only=True):
    """One candidate at one prompt position (vLLM's ``prompt_logprobs`` entries, keyed by token id)."""

    logprob: float
    rank: int | None
    decoded_token: str


class CompletionLogprobs(_Out, kw_only=True):
    """The legacy completions logprobs: parallel lists, one entry per token. ``top_logprobs[i]`` maps token
    text to logprob (the sampled token included); the first prompt token (with ``echo``) has null entries."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out, kw_only=True):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: Matched = UNSET
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | UnsetType = UNSET


class CompletionResponse(_Out, kw_only=True):
    """``POST /v1/completions`` without streaming."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | UnsetType = UNSET


class CompletionChunk(_Out, kw_only=True):
    """One ``data:`` event of a streamed completion (``object`` stays ``text_completion``, as OpenAI sends)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | UnsetType = UNSET
    usage: Usage | None | UnsetType = UNSET


# --- models, native ---------------------------------------------------------------------------------------------
class ModelCard(_Out, kw_only=True):
    """A model in ``GET /v1/models``; ``max_model_len`` is its context length in tokens (vLLM's and SGLang's
    field)."""

    id: str
    object: str = "model"
    created: int
    owned_by: str = "sgl_ray"
    max_model_len: int | UnsetType = UNSET


class AdapterCard(ModelCard, kw_only=True):
    """A LoRA adapter in ``GET /v1/models``: ``parent`` is the base model's id, ``root`` the adapter's path."""

    parent: str
    root: str


class ModelList(_Out, kw_only=True):
    """``GET /v1/models``.

    >>> encode(ModelList(data=[ModelCard(id="m", created=0, max_model_len=8192)]))
    b'{"object":"list","data":[{"id":"m","object":"model","created":0,"owned_by":"sgl_ray","max_model_len":8192}]}'
    """

    object: str = "list"
    data: list[ModelCard]


class GenerateResponse(_Out, kw_only=True):
    """SGLang-native ``/generate`` result: ``meta_info`` holds ``id``, token counts, ``finish_reason`` (the
    engine's dict, e.g. ``{"type": "stop", "matched": 2}``) and, when asked, logprobs."""

    text: str
    output_ids: list[int]
    meta_info: dict[str, Any]

    @classmethod
    def from_engine(cls, result: Mapping[str, Any]) -> GenerateResponse:
        """From one result dict of :meth:`sgl_ray.Engine.generate`."""
        return cls(text=result["text"], output_ids=list(result["output_ids"]), meta_info=result["meta_info"])


# --- helpers --------------------------------------------------------------------------------------------------------
def openai_finish_reason(reason: Mapping[str, Any] | None) -> str | None:
    """The engine's finish reason (``{"type": "stop" | "length" | "abort", ...}``) as OpenAI's string.

    ``stop`` (EOS, stop token, stop string) and ``length`` map to themselves. ``abort`` stays ``"abort"``, as
    SGLang returns: OpenAI has no such value, but reporting an aborted request (client cancel, KV cache too
    small) as a natural ``"stop"`` would hide a truncated answer; the openai client accepts unknown strings.
    """
    if reason is None:
        return None
    return str(reason.get("type", "stop"))


def matched_stop(reason: Mapping[str, Any] | None) -> int | str | None:
    """What ended a choice that stopped: the stop string, stop-regex pattern or token id (EOS or a stop token);
    None for any other ending (SGLang's ``matched_stop``).

    >>> matched_stop({"type": "stop", "matched": 2}), matched_stop({"type": "length", "length": 16})
    (2, None)
    """
    if reason is None or reason.get("type") != "stop":
        return None
    matched = reason.get("matched")
    return matched if isinstance(matched, (int, str)) and not isinstance(matched, bool) else None


def new_request_id(prefix: str) -> str:
    """``chatcmpl-<32 hex>`` / ``cmpl-<32 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def new_tool_call_id() -> str:
    """``call_<24 hex>``: the id of one tool call."""
    return f"{TOOL_CALL_ID_PREFIX}_{uuid.uuid4().hex[:24]}"


def now() -> int:
    """``created``: Unix seconds."""
    return int(time.time())


def encode(obj: Any) -> bytes:
    """JSON bytes of a response Struct (or any msgspec-encodable value)."""
    return _ENCODER.encode(obj)


def sse_event(obj: Any) -> bytes:
    """One server-sent event: ``b"data: " + json + b"\\n\\n"``."""
    return b"data: " + _ENCODER.encode(obj) + b"\n\n"


def error_body(err: SglRayError) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` for ``err`` (send with ``err.status_code``)."""
    return _ENCODER.encode(err.to_dict())


def internal_error_body(message: str = "Internal server error") -> bytes:
    """The body of a 500 for an unexpected exception (never leak the traceback to the client)."""
    return _ENCODER.encode(SglRayError(message).to_dict())


def sse_error(err: SglRayError) -> bytes:
    """An error event for a stream that already started (the HTTP status was already sent as 200)."""
    return b"data: " + error_body(err) + b"\n\n"


class SSEFraming(NamedTuple):
    """How a stream's events are written: each event, an error after the stream started, and the closing bytes."""

    event: Callable[[Any], bytes]
    error: Callable[[SglRayError], bytes]
    done: bytes


CHAT_SSE = SSEFraming(sse_event, sse_error, SSE_DONE)
"""Chat and completions streams: ``data: {json}`` events, ``data: [DONE]`` at the end."""
