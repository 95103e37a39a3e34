"""Chat prompts with tools for callers that drive an engine directly (the frontend language's ``EngineBackend``,
the Ray Data processor): the same chat-template rendering, tool plan, forced call format and parsers as
``/v1/chat/completions``, without an HTTP request.

Example::

    >>> fmt = ToolFormat.for_tokenizer(engine.tokenizer, engine.args.tool_call_parser)  # doctest: +SKIP
    >>> prompt = tool_prompt(engine.tokenizer, fmt, messages, tools, SamplingParams(max_new_tokens=64),
    ...                      tool_choice="required")  # doctest: +SKIP
    >>> out = engine.generate(input_ids=prompt.input_ids, sampling_params=prompt.params)  # doctest: +SKIP
    >>> prompt.parse(out["text"]).calls  # [ToolCall(name=..., arguments='{...}')]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from sgl_ray.function_call import DEFAULT_TOOL_CALL_PARSER, detect_tool_call_parser, get_tool_call_parser
from sgl_ray.protocol.chat_parsing import OutputParsing, ParsedChoice, constrain_output
from sgl_ray.protocol.chat_template import CallsAsText, render_chat
from sgl_ray.protocol.decoding import validation_error
from sgl_ray.protocol.requests import ChatMessage
from sgl_ray.protocol.tools import ToolPlan
from sgl_ray.reasoning import ReasoningParser
from sgl_ray.sampling.params import SamplingParams


class ToolFormat(NamedTuple):
    """How a model writes tool calls: the parser's name, and how assistant calls are written into the prompt when
    the chat template does not render ``tool_calls`` itself (None when it does)."""

    parser: str
    calls_as_text: CallsAsText | None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, tool_call_parser: str | None = None) -> ToolFormat:
        """``tool_call_parser`` if given, else the format the chat template shows, else the default (hermes)."""
        template = getattr(tokenizer, "chat_template", None) or ""
        template = "\n".join(template.values()) if isinstance(template, dict) else template
        parser = tool_call_parser or detect_tool_call_parser(template) or DEFAULT_TOOL_CALL_PARSER
        calls_as_text = None if "tool_calls" in template else get_tool_call_parser(parser)([]).format_calls
        return cls(parser, calls_as_text)


class ToolPrompt(NamedTuple):
    """A rendered chat prompt with tools: its ids, the sampling parameters (the call format forced for
    ``required`` or a named function), and how to parse the output."""

    input_ids: list[int]
    params: SamplingParams
    parsing: OutputParsing

    def parse(self, text: str) -> ParsedChoice:
        """The output split into reasoning (with a reasoning parser), content and calls."""
        return self.parsing.new_choice().parse(text)


def tool_prompt(
    tokenizer: Any,
    fmt: ToolFormat,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    tools: list[dict[str, Any]] | None,
    params: SamplingParams,
    *,
    tool_choice: str | dict[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
    reasoning: type[ReasoningParser] | None = None,
) -> ToolPrompt:
    """Render ``messages`` (chat messages or their dicts) with ``tools`` (OpenAI chat shape) and plan the output.
    Bad tools, tool choices or messages raise :class:`~sgl_ray.errors.InvalidRequestError`."""
    chat = [m if isinstance(m, ChatMessage) else _message(m) for m in messages]
    plan = ToolPlan.build(tools, tool_choice, parallel_tool_calls, fmt.parser)
    parsing = OutputParsing(plan, reasoning)
    ids = render_chat(tokenizer, chat, tools=tools if plan.parser else None, calls_as_text=fmt.calls_as_text)
    params = constrain_output(params.normalized(), parsing, None if params.skip_special_tokens else False)
    return ToolPrompt(ids, params, parsing)


def _message(m: Mapping[str, Any]) -> ChatMessage:
    try:
        return msgspec.convert({k: v for k, v in m.items() if v is not None}, ChatMessage)
    except msgspec.ValidationError as e:
        err = validation_error(str(e))
        raise type(err)(f"Invalid message: {err.message}", param="messages") from None
