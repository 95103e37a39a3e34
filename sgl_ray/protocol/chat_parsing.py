"""One chat choice's output text → ``reasoning_content``, ``content`` and ``tool_calls`` (whole or streamed).

The reasoning parser (if any) sees the text first; only the answer after the reasoning goes to the tool-call parser
(if any). Without either, the text is the content, untouched.

Invariant: the pieces :meth:`ChoiceParser.feed` and :meth:`ChoiceParser.flush` return concatenate to what
:meth:`ChoiceParser.parse` returns for the whole text, as long as every call is complete and valid; a call whose name
was already streamed stays a call even if its text then goes wrong (the whole-text parse makes it content).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import msgspec

from sgl_ray.errors import InvalidRequestError
from sgl_ray.function_call import ToolCall, ToolCallDelta, ToolCallParser
from sgl_ray.function_call.base import json_schema_format
from sgl_ray.protocol.requests import ChatCompletionRequest
from sgl_ray.protocol.responses import new_tool_call_id
from sgl_ray.protocol.tools import ToolPlan
from sgl_ray.reasoning import ReasoningParser, after_reasoning
from sgl_ray.sampling.params import SamplingParams


class ParsedChoice(NamedTuple):
    reasoning: str | None  # None without a reasoning parser
    content: str
    calls: list[ToolCall]


class ChoicePieces(NamedTuple):
    reasoning: str
    content: str
    calls: list[ToolCallDelta]


class ChoiceParser:
    """Parses one choice. ``call_ids`` holds the ids given to its calls, in order (assigned on first sight).

    ``calls_only``: the answer was forced into calls (``tool_choice`` ``required`` or a named function), so text
    that is not a complete call is the rest of a call cut short (``max_tokens``); it is dropped, not content.
    """

    def __init__(
        self, tools: ToolCallParser | None, reasoning: ReasoningParser | None, calls_only: bool = False
    ) -> None:
        self.tools = tools
        self.reasoning = reasoning
        self.calls_only = calls_only and tools is not None
        self.call_ids: list[str] = []

    @property
    def separates_reasoning(self) -> bool:
        return self.reasoning is not None

    def call_id(self, index: int) -> str:
        while len(self.call_ids) <= index:
            self.call_ids.append(new_tool_call_id())
        return self.call_ids[index]

    def parse(self, text: str) -> ParsedChoice:
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.parse(text)
        if self.tools is None:
            return ParsedChoice(reasoning, text, [])
        parsed = self.tools.parse(text)
        return ParsedChoice(reasoning, "" if self.calls_only else parsed.content, parsed.calls)

    def feed(self, text: str) -> ChoicePieces:
        reasoning = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
        if self.tools is None:
            return ChoicePieces(reasoning, text, [])
        out = self.tools.feed(text)
        return ChoicePieces(reasoning, "" if self.calls_only else out.content, out.calls)

    def flush(self) -> ChoicePieces:
        reasoning = ""
        text = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.flush()
        if self.tools is None:
            return ChoicePieces(reasoning, text, [])
        a = self.tools.feed(text) if text else None
        b = self.tools.flush()
        content = "" if self.calls_only else (a.content if a else "") + b.content
        return ChoicePieces(reasoning, content, (a.calls if a else []) + b.calls)


class OutputParsing(NamedTuple):
    """What a request's choices are parsed with: its tool plan and reasoning parser class (either may be None).

    Example::

        >>> parsing = OutputParsing(ToolPlan.build(tools, "auto", None, "qwen25"), None)  # doctest: +SKIP
        >>> parsing.new_choice().parse(text)  # doctest: +SKIP
    """

    tools: ToolPlan | None
    reasoning: type[ReasoningParser] | None

    @property
    def active(self) -> bool:
        return self.reasoning is not None or (self.tools is not None and self.tools.parser is not None)

    def new_choice(self) -> ChoiceParser:
        tools = self.tools.new_parser() if self.tools is not None else None
        reasoning = self.reasoning() if self.reasoning is not None else None
        return ChoiceParser(tools, reasoning, calls_only=self.tools is not None and self.tools.constrained)


def output_params(
    req: ChatCompletionRequest, params: SamplingParams, parsing: OutputParsing
) -> SamplingParams:
    """``params`` with what ``parsing`` needs from the engine: the call format forced for ``tool_choice``
    ``required`` or a named function, a request's grammar moved after the reasoning when a reasoning parser is on
    (as a structural tag), and special tokens kept for parsers whose markers are special tokens."""
    return constrain_output(params, parsing, req.skip_special_tokens)


def constrain_output(
    params: SamplingParams, parsing: OutputParsing, skip_special_tokens: bool | None = None
) -> SamplingParams:
    """:func:`output_params` for callers without a chat request (the frontend language, Ray Data):
    ``skip_special_tokens`` is what the caller asked for (None: not set, so parsers may keep special tokens)."""
    tools = parsing.tools
    calls = tools.call_format() if tools is not None else None
    grammar = params.grammar
    if calls is not None and grammar is not None:
        raise InvalidRequestError(
            f"tool_choice 'required' or a named function cannot be combined with '{grammar[0]}' "
            "(response_format, json_schema, regex or ebnf).",
            param="tool_choice",
        )
    changes: dict[str, Any] = {}
    answer = calls if calls is not None else _answer_format(grammar) if parsing.reasoning else None
    if answer is not None:
        tag = after_reasoning(parsing.reasoning, answer) if parsing.reasoning else _tag(answer)
        changes = {"json_schema": None, "regex": None, "ebnf": None, "structural_tag": json.dumps(tag)}
    parser = tools.parser if tools is not None else None
    if parser is not None and parser.needs_special_tokens and skip_special_tokens is None:
        changes["skip_special_tokens"] = False
    return msgspec.structs.replace(params, **changes).normalized() if changes else params


def _tag(fmt: dict[str, Any]) -> dict[str, Any]:
    return {"type": "structural_tag", "format": fmt}


def _answer_format(grammar: tuple[str, str] | None) -> dict[str, Any] | None:
    """A request's grammar as a structural-tag format."""
    if grammar is None:
        return None
    kind, value = grammar
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"json_schema: not valid JSON: {e}", param="json_schema") from None
        try:
            return json_schema_format(schema)
        except InvalidRequestError as e:
            raise InvalidRequestError(
                e.message.replace("'tools'", "'response_format'"), param="json_schema"
            ) from None
    if kind == "regex":
        return {"type": "regex", "pattern": value}
    if kind == "ebnf":
        return {"type": "grammar", "grammar": value}
    return json.loads(value).get("format")  # a structural tag already


def chat_output_parsing(
    req: ChatCompletionRequest, tool_call_parser: str, reasoning_parser: type[ReasoningParser] | None
) -> OutputParsing:
    """How ``req``'s choices are parsed on a server whose tool-call format is ``tool_call_parser`` and whose
    reasoning parser is ``reasoning_parser`` (``separate_reasoning: false`` in the request turns it off)."""
    plan = ToolPlan.build(req.tools, req.tool_choice, req.parallel_tool_calls, tool_call_parser)
    reasoning = reasoning_parser if req.separate_reasoning is not False else None
    return OutputParsing(plan, reasoning)
