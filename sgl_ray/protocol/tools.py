"""OpenAI ``tools``, ``tool_choice`` and ``parallel_tool_calls`` → what the output must be and how it is parsed.

Checks (each a 400 with ``param``): a tool is ``{"type": "function", "function": {"name", "description"?,
"parameters"?, "strict"?}}`` with a name of 1–64 letters, digits, ``_`` or ``-``, unique among the tools, and
``parameters`` a JSON-schema object; ``tool_choice`` is ``"none"``, ``"auto"``, ``"required"`` or
``{"type": "function", "function": {"name": <one of the tools>}}`` and needs ``tools``; ``required`` or a named
function cannot be combined with another grammar (``response_format``, ``json_schema``, ``regex``, ``ebnf``).

Modes: ``none`` leaves the output alone (no calls are parsed); ``auto`` (the default with tools) parses what the
model wrote; ``required`` and a named function constrain the output to the parser's call format with arguments
that match each function's ``parameters`` (one call unless ``parallel_tool_calls`` is true, the default, for
``required``; one call of that function for a named one).
"""

from __future__ import annotations

import re
from typing import Any, Literal, NamedTuple

from sgl_ray.errors import InvalidRequestError
from sgl_ray.function_call import Tool, ToolCallParser, get_tool_call_parser

ToolMode = Literal["none", "auto", "required", "function"]
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolChoice(NamedTuple):
    mode: ToolMode
    name: str | None = None  # the function of mode "function"


def parse_tools(tools: list[dict[str, Any]] | None) -> list[Tool]:
    """The request's tools, checked (a missing ``parameters`` means no arguments)."""
    out: list[Tool] = []
    for i, item in enumerate(tools or []):
        where = f"tools[{i}]"
        if item.get("type") != "function":
            raise InvalidRequestError(
                f"Invalid value for '{where}.type': only 'function' tools are supported.", param="tools"
            )
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"Missing required parameter: '{where}.function'.", param="tools")
        tool = parse_function(fn, f"{where}.function")
        if any(t.name == tool.name for t in out):
            raise InvalidRequestError(
                f"Invalid 'tools': the function name '{tool.name}' is repeated.", param="tools"
            )
        out.append(tool)
    return out


def parse_function(fn: dict[str, Any], where: str) -> Tool:
    """One function definition (``name``, ``description``?, ``parameters``?), checked; ``where`` is its path in
    the request for error messages (``tools[0].function`` in chat, ``tools[0]`` in the Responses API)."""
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"Invalid '{where}.name': expected 1 to 64 letters, digits, underscores or dashes, got {name!r}.",
            param="tools",
        )
    params = fn.get("parameters")
    if params is None:
        params = _NO_ARGUMENTS
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise InvalidRequestError(
            f"Invalid '{where}.parameters': expected a JSON schema of an object.", param="tools"
        )
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise InvalidRequestError(
            f"Invalid type for '{where}.description': expected a string.", param="tools"
        )
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise InvalidRequestError(f"Invalid type for '{where}.strict': expected a boolean.", param="tools")
    return Tool(name, params)


def parse_tool_choice(tool_choice: str | dict[str, Any] | None, tools: list[Tool]) -> ToolChoice:
    """The request's ``tool_choice`` (default ``auto`` with tools, ``none`` without), checked against ``tools``."""
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if not tools:
        raise InvalidRequestError(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            param="tool_choice",
        )
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequestError(
                f"Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or a function, got "
                f"{tool_choice!r}.",
                param="tool_choice",
            )
        return ToolChoice(tool_choice)  # type: ignore[arg-type]
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequestError(
            "Invalid value for 'tool_choice': a named tool choice is "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if all(t.name != name for t in tools):
        raise InvalidRequestError(
            f"Invalid value for 'tool_choice': no function named '{name}' in 'tools'.", param="tool_choice"
        )
    return ToolChoice("function", name)


def check_message_tool_calls(
    role: str, tool_calls: list[dict[str, Any]] | None, tool_call_id: str | None
) -> None:
    """A message's tool fields: calls only on assistant messages, each with a function name and arguments; a tool
    message names the call it answers."""
    if role == "tool" and not tool_call_id:
        raise InvalidRequestError(
            "Missing parameter 'tool_call_id': messages with role 'tool' must have a 'tool_call_id'.",
            param="messages",
        )
    if tool_calls is None:
        return
    if role != "assistant":
        raise InvalidRequestError("Only assistant messages can have 'tool_calls'.", param="messages")
    for call in tool_calls:
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(
                "Invalid 'messages': each of an assistant message's 'tool_calls' needs 'function.name'.",
                param="messages",
            )
        if not isinstance(fn.get("arguments", "{}"), (str, dict)):
            raise InvalidRequestError(
                "Invalid 'messages': a tool call's 'function.arguments' must be a JSON string.",
                param="messages",
            )


class ToolPlan(NamedTuple):
    """What a chat request's tools ask of its output.

    Example::

        >>> plan = ToolPlan.build(tools, "required", None, "qwen25")  # doctest: +SKIP
        >>> plan.call_format()  # the grammar of the calls (see chat_parsing.output_params)  # doctest: +SKIP
        >>> parser = plan.new_parser()  # one per choice  # doctest: +SKIP
    """

    tools: list[Tool]
    choice: ToolChoice
    parallel: bool
    parser: type[ToolCallParser] | None  # None: calls are not parsed (no tools, or tool_choice "none")

    @classmethod
    def build(
        cls,
        raw_tools: list[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any] | None,
        parallel_tool_calls: bool | None,
        parser_name: str,
    ) -> ToolPlan:
        tools = parse_tools(raw_tools)
        choice = parse_tool_choice(tool_choice, tools)
        parser = None if choice.mode == "none" else get_tool_call_parser(parser_name)
        return cls(tools, choice, parallel_tool_calls is not False, parser)

    @property
    def constrained(self) -> bool:
        return self.choice.mode in ("required", "function")

    def call_format(self) -> dict[str, Any] | None:
        """The structural-tag format that forces the output into calls, for ``required`` and a named function."""
        if not self.constrained or self.parser is None:
            return None
        if self.choice.mode == "function":
            tools, parallel = [t for t in self.tools if t.name == self.choice.name], False
        else:
            tools, parallel = self.tools, self.parallel
        return self.parser(self.tools).call_format(tools, parallel)

    def new_parser(self) -> ToolCallParser | None:
        """A fresh parser for one choice (None when calls are not parsed)."""
        if self.parser is None:
            return None
        one = self.choice.mode == "function" or not self.parallel
        return self.parser(self.tools, max_calls=1 if one else None)
