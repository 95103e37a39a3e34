"""Chat messages → prompt token ids through the tokenizer's own chat template.

Invariant: ``render_chat(tok, messages)`` equals ``tok.apply_chat_template(dicts, tokenize=True,
add_generation_prompt=True)``'s ids, where ``dicts`` are the messages as :func:`message_dicts` gives them: text
parts joined with newlines, ``developer`` sent as ``system`` (chat templates predate that role), null content as
``""``, and a tool call's JSON-string ``arguments`` as the object they encode (what templates that render calls
expect). Template failures caused by the messages (a template's ``raise_exception``, non-alternating roles) are
400s with ``param="messages"``.

``chat_template_kwargs`` are template variables only: the ones that would steer the tokenizer (``tokenize``,
``truncation``, …, :data:`RESERVED_TEMPLATE_KWARGS`) are 400s, as is ``messages`` (the server renders the request's
own); ``tools`` and ``documents``, which templates loop over, must be arrays of objects; and ``chat_template`` (a
template sent by the client, which then runs on the server) is a 400 unless the server trusts request templates
(vLLM's ``--trust-request-chat-template``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jinja2 import TemplateError

from sgl_ray.errors import InvalidRequestError
from sgl_ray.function_call import ToolCall
from sgl_ray.protocol.requests import ChatMessage

CallsAsText = Callable[[list[ToolCall]], str]

RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
"""``apply_chat_template`` arguments that are not template variables: the server sets them (a client's truncation
or padding would also change the tokenizer that every request shares)."""
SERVER_TEMPLATE_VARIABLES = frozenset({"messages"})
"""Template variables the server fills from the request's own fields."""
LIST_TEMPLATE_VARIABLES = frozenset({"tools", "documents"})
"""Template variables that templates loop over (each item an object)."""


def check_template_kwargs(
    template_kwargs: Mapping[str, Any] | None, *, trust_request_chat_template: bool = False
) -> None:
    """Raise a 400 (``param="chat_template_kwargs"``) for a key that is not a template variable or that the server
    sets, for ``tools`` or ``documents`` that are not arrays of objects, and for ``chat_template`` unless
    ``trust_request_chat_template``.

    >>> check_template_kwargs({"enable_thinking": False})
    >>> try:
    ...     check_template_kwargs({"chat_template": "{{ messages }}"})
    ... except InvalidRequestError as e:
    ...     print(e.param)
    chat_template_kwargs
    """
    for key, value in (template_kwargs or {}).items():
        if key == "chat_template" and not trust_request_chat_template:
            raise InvalidRequestError(
                "Invalid 'chat_template_kwargs': a chat template sent with the request is disabled on this "
                "server (start it with --trust-request-chat-template to allow it).",
                param="chat_template_kwargs",
            )
        if key in RESERVED_TEMPLATE_KWARGS:
            raise InvalidRequestError(
                f"Invalid 'chat_template_kwargs': '{key}' is not a template variable (the server sets it).",
                param="chat_template_kwargs",
            )
        if key in SERVER_TEMPLATE_VARIABLES:
            raise InvalidRequestError(
                f"Invalid 'chat_template_kwargs': '{key}' is set by the server from the request.",
                param="chat_template_kwargs",
            )
        if key in LIST_TEMPLATE_VARIABLES and not (
            isinstance(value, list) and all(isinstance(item, dict) for item in value)
        ):
            raise InvalidRequestError(
                f"Invalid type for 'chat_template_kwargs.{key}': expected an array of objects.",
                param="chat_template_kwargs",
            )


def message_dicts(
    messages: Sequence[ChatMessage | Mapping[str, Any]], calls_as_text: CallsAsText | None = None
) -> list[dict[str, Any]]:
    """The messages as the plain dicts chat templates expect. With ``calls_as_text`` (for a template that does not
    render ``tool_calls``) an assistant message's calls are written into its content instead."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, ChatMessage):
            out.append(dict(m))
            continue
        m.check()
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text() or ""}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls and calls_as_text is not None:
            calls = calls_as_text([_call(c) for c in m.tool_calls])
            d["content"] = f"{d['content']}\n{calls}" if d["content"] else calls
        elif m.tool_calls is not None:
            d["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def render_chat(
    tokenizer: Any,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    calls_as_text: CallsAsText | None = None,
    trust_request_chat_template: bool = False,
    continue_final_message: bool = False,
) -> list[int]:
    """Prompt token ids of ``messages`` under ``tokenizer``'s chat template.

    ``continue_final_message``: the prompt ends inside the last message (an assistant message the model goes on
    writing), without its end-of-turn tokens; use it with ``add_generation_prompt=False``.

    ``tools`` is passed to the template (templates that know tools render them); ``template_kwargs`` are extra
    template variables (e.g. ``{"enable_thinking": False}`` for Qwen3; checked by :func:`check_template_kwargs`,
    which ``trust_request_chat_template`` passes on to). ``calls_as_text``: see :func:`message_dicts`.

    Example::

        >>> ids = render_chat(tokenizer, [{"role": "user", "content": "Hi"}])
        >>> tokenizer.decode(ids).endswith("<|im_start|>assistant\\n")  # a ChatML template
        True
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "This model's tokenizer has no chat template; use /v1/completions with a plain prompt.",
            param="messages",
        )
    check_template_kwargs(template_kwargs, trust_request_chat_template=trust_request_chat_template)
    kwargs = dict(template_kwargs or {})
    if tools is not None:
        kwargs["tools"] = tools
    try:
        out = tokenizer.apply_chat_template(
            message_dicts(messages, calls_as_text),
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **kwargs,
        )
    except InvalidRequestError:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, IndexError) as e:  # raise_exception, odd input
        raise InvalidRequestError(
            f"The chat template could not render the messages: {e}", param="messages"
        ) from e
    return _ids(out)


def _ids(out: Any) -> list[int]:
    """Token ids from what ``apply_chat_template(tokenize=True)`` returns: a list (transformers 4), a
    dict/BatchEncoding with ``input_ids`` (transformers 5), possibly batched or a tensor."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(t) for t in out]


def _call(call: Mapping[str, Any]) -> ToolCall:
    fn = call["function"]
    args = fn.get("arguments", "{}")
    return ToolCall(fn["name"], args if isinstance(args, str) else json.dumps(args))


def _template_call(call: Mapping[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, Mapping) or not isinstance(fn.get("arguments"), str):
        return dict(call)
    try:
        args = json.loads(fn["arguments"])
    except (json.JSONDecodeError, RecursionError):  # not JSON, or too deep: the template sees the string
        return dict(call)
    return {**call, "function": {**fn, "arguments": args}} if isinstance(args, dict) else dict(call)
