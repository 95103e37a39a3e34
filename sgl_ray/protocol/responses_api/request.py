"""``POST /v1/responses`` request bodies, turned into the chat request they mean.

The Responses API is served on the chat path: :meth:`ResponsesRequest.to_chat` maps ``instructions`` and ``input``
to chat messages, ``tools``/``tool_choice`` to their chat shapes, ``max_output_tokens`` to
``max_completion_tokens`` and ``text.format`` to ``response_format``; from there the chat template, tool plan,
forced call format and parsers are the chat endpoint's. :func:`responses_errors` renames the chat fields in the
400s that path raises back to the Responses API's names.

Input items: a message (``{"role", "content"}``, ``type: "message"`` optional; roles ``user``, ``system``,
``developer``, ``assistant``; content a string or ``input_text``/``output_text`` parts), a ``function_call`` (an
earlier call of the model: it joins the assistant turn before it), a ``function_call_output`` (a tool result:
a ``tool`` message answering its ``call_id``, which must be a ``function_call`` of the input), and ``reasoning``
items of earlier outputs (dropped, as chat templates drop past reasoning; an input of nothing else is a 400).

Stateless: nothing is stored. ``store`` is accepted either way; ``previous_response_id``, ``conversation``,
``prompt``, ``background: true``, ``truncation: "auto"``, built-in tools and item references are 400s naming the
parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import msgspec

from sgl_ray.errors import InvalidRequestError
from sgl_ray.protocol.requests import ChatCompletionRequest, ChatMessage, _Body
from sgl_ray.protocol.sampling import CONTEXT_LENGTH_EXCEEDED
from sgl_ray.protocol.structured import JsonSchemaFormat, ResponseFormat
from sgl_ray.protocol.tools import parse_function

_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
_MEDIA_PARTS = ("input_image", "input_file", "input_audio", "image_url")
_STATEFUL = "this server stores no responses: send the whole conversation in 'input' (stateless)"
# chat field → the Responses API field it came from
_RENAMES = {
    "response_format.json_schema.schema": "text.format.schema",  # before its prefix "response_format"
    "max_completion_tokens": "max_output_tokens",
    "messages": "input",
    "response_format": "text",
    "json_schema": "text",
}


class TextFormat(_Body, kw_only=True):
    """``text.format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "name",
    "schema", "strict"}`` (flat, unlike chat's ``response_format``)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Body, kw_only=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Body, kw_only=True):
    """``POST /v1/responses``.

    Example::

        >>> from sgl_ray.protocol import decode_request
        >>> req = decode_request("responses", b'{"model": "m", "input": "Hi", "instructions": "Be brief."}')
        >>> [(m.role, m.content) for m in req.to_chat().messages]
        [('system', 'Be brief.'), ('user', 'Hi')]
    """

    input: str | list[dict[str, Any]]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    # not available on a stateless server: a 400 when set
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    # extras (SGLang/vLLM names)
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool | None = None

    def check(self) -> None:
        for name in ("previous_response_id", "conversation", "prompt"):
            if getattr(self, name) is not None:
                raise InvalidRequestError(f"'{name}' is not supported: {_STATEFUL}.", param=name)
        if self.background:
            raise InvalidRequestError(
                "'background' is not supported: responses run in the foreground (stream them instead).",
                param="background",
            )
        if self.truncation not in (None, "disabled"):
            raise InvalidRequestError(
                f"Invalid value for 'truncation': only 'disabled' is supported, got {self.truncation!r}.",
                param="truncation",
            )
        with responses_errors():
            self.to_chat().check()

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request this request means (not yet checked: see :func:`responses_errors`)."""
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            messages.append(ChatMessage(role="user", content=self.input))
        else:
            messages += input_messages(self.input)
        tools = [chat_tool(t, i) for i, t in enumerate(self.tools or [])]
        return ChatCompletionRequest(
            messages=messages,
            model=self.model,
            max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stream=self.stream,
            stop=self.stop,
            seed=self.seed,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            user=self.user,
            tools=tools or None,
            tool_choice=chat_tool_choice(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format(),
            chat_template_kwargs=self.chat_template_kwargs,
            separate_reasoning=self.separate_reasoning,
        )

    @property
    def grammar_param(self) -> str | None:
        """``text`` when ``text.format`` constrains the output (see ``ChatCompletionRequest.grammar_param``)."""
        fmt = self.text.format if self.text is not None else None
        return "text" if fmt is not None and fmt.type != "text" else None

    def response_format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return ResponseFormat(type="json_object")
        if fmt.schema_ is None:
            raise InvalidRequestError("Missing required parameter: 'text.format.schema'.", param="text")
        return ResponseFormat(
            type="json_schema", json_schema=JsonSchemaFormat(name=fmt.name or "output", schema_=fmt.schema_)
        )


@contextmanager
def responses_errors() -> Iterator[None]:
    """Re-raise the chat path's 400s with the Responses API's field names (``max_completion_tokens`` →
    ``max_output_tokens``, ``messages`` → ``input``, ``response_format`` → ``text``)."""
    try:
        yield
    except InvalidRequestError as e:
        message = e.message
        for old, new in _RENAMES.items():
            message = message.replace(f"'{old}", f"'{new}")
        if e.code == CONTEXT_LENGTH_EXCEEDED:
            message = re.sub(r"\bmessages\b", "input", message)
        raise InvalidRequestError(message, param=_RENAMES.get(e.param or "", e.param), code=e.code) from None


def input_messages(items: list[dict[str, Any]]) -> list[ChatMessage]:
    """Chat messages of ``input`` items (see the module docstring)."""
    if not items:
        raise InvalidRequestError(
            "Invalid 'input': empty array. Expected a string or an array with minimum length 1.",
            param="input",
        )
    messages: list[ChatMessage] = []
    calls: set[str] = set()
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"Invalid type for '{where}': expected an object.", param="input")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise InvalidRequestError(
                    f"Invalid value for '{where}.role': expected one of {', '.join(_MESSAGE_ROLES)}, got {role!r}.",
                    param="input",
                )
            messages.append(ChatMessage(role=role, content=_text(item.get("content"), f"{where}.content")))
        elif kind == "function_call":
            call_id, name, arguments = (item.get(k) for k in ("call_id", "name", "arguments"))
            for key, value in (("call_id", call_id), ("name", name), ("arguments", arguments)):
                if not isinstance(value, str):
                    raise InvalidRequestError(
                        f"Missing required parameter: '{where}.{key}' (a string).", param="input"
                    )
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":  # the calls of one assistant turn
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
            calls.add(call_id)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise InvalidRequestError(f"Missing required parameter: '{where}.call_id'.", param="input")
            if call_id not in calls:
                raise InvalidRequestError(
                    f"No tool call found for function call output with call_id {call_id} (send the "
                    "function_call item before its output).",
                    param="input",
                )
            output = _text(item.get("output"), f"{where}.output")
            messages.append(ChatMessage(role="tool", content=output, tool_call_id=call_id))
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise InvalidRequestError(
                f"Invalid '{where}': item references need stored items; {_STATEFUL}.", param="input"
            )
        else:
            raise InvalidRequestError(
                f"Invalid value for '{where}.type': {kind!r} items are not supported (messages, function_call, "
                "function_call_output and reasoning are).",
                param="input",
            )
    if not messages:  # only reasoning items, which are dropped
        raise InvalidRequestError(
            "Invalid 'input': there is nothing to answer. The array holds only reasoning items, which are "
            "dropped; send at least one message, function_call or function_call_output item.",
            param="input",
        )
    return messages


def _text(content: Any, where: str) -> str:
    """A content string, or the text of its parts joined with newlines (as chat joins text parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"Invalid type for '{where}': expected a string or an array.", param="input"
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise InvalidRequestError(
                f"Invalid '{where}[{j}]': {kind} inputs are not supported yet (text only).", param="input"
            )
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            continue
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"Invalid '{where}[{j}]': expected an input_text or output_text part with 'text'.",
                param="input",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def chat_tool(tool: Any, i: int) -> dict[str, Any]:
    """A Responses API function tool (``{"type": "function", "name", "description", "parameters", "strict"}``) in
    the chat shape. Built-in tools (``web_search``, ``file_search``, ``code_interpreter``, …) are 400s."""
    where = f"tools[{i}]"
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise InvalidRequestError(
            f"Invalid value for '{where}.type': built-in tool {kind!r} is not supported; this server runs only "
            "'function' tools (the caller runs them).",
            param="tools",
        )
    if isinstance(tool.get("function"), dict) and "name" not in tool:  # the chat shape, sent here anyway
        return tool
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    parse_function(fn, where)
    return {"type": "function", "function": fn}


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """``tool_choice`` in the chat shape: the strings pass; ``{"type": "function", "name"}`` names a function."""
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") == "function":
        return choice
    raise InvalidRequestError(
        f"Invalid value for 'tool_choice': {choice.get('type')!r} is not supported; use 'none', 'auto', "
        '\'required\' or {"type": "function", "name": ...}.',
        param="tool_choice",
    )
