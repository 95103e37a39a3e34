"""Qwen 2.5 / Qwen 3 / Hermes: each call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
after optional plain text; several calls follow each other (newline-separated)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sgl_ray.function_call.base import (
    PartialCall,
    Scan,
    Tool,
    ToolCall,
    ToolCallParser,
    held_marker,
    json_schema_format,
    tag,
    tags_format,
)
from sgl_ray.function_call.json_scan import InvalidJSON, scan_call_object, skip_ws

BEGIN, END = "<tool_call>", "</tool_call>"


class HermesParser(ToolCallParser):
    """``<tool_call>`` blocks holding one JSON call each. A block that is not a valid call of a known function is
    content, markers included."""

    name = "hermes"
    template_markers = (BEGIN,)

    def scan(self, text: str) -> Scan:
        content: list[str] = []
        calls: list[PartialCall] = []
        pos = 0
        while True:
            if calls:  # whitespace between and after calls is not content
                gap = skip_ws(text, pos)
                if gap == len(text):
                    return Scan("".join(content), calls, text[pos:], 0)
                if text.startswith(BEGIN, gap) or BEGIN.startswith(text[gap:]):
                    pos = gap
            start = text.find(BEGIN, pos)
            if start < 0:
                held = held_marker(text, pos, BEGIN)
                content.append(text[pos:held])
                return Scan("".join(content), calls, text[held:], 0)
            content.append(text[pos:start])
            body = start + len(BEGIN)
            stop = text.find(END, body)
            region_end = len(text) if stop < 0 else stop + len(END)
            call = self._call(text[body : len(text) if stop < 0 else stop])
            if call is None or (stop >= 0 and not call.complete):  # not a call: the block is content
                content.append(text[start:region_end])
                if stop < 0:
                    return Scan("".join(content), calls)
            elif stop < 0:
                calls.append(call)
                return Scan("".join(content), calls, text[start:], 1)
            else:
                calls.append(call)
            pos = region_end

    def _call(self, body: str) -> PartialCall | None:
        """The call in a block's body so far, or None if the body cannot be a valid call."""
        try:
            obj = scan_call_object(body, 0, ("arguments",))
        except InvalidJSON:
            return None
        if obj.name is not None and not self.known(obj.name):
            return None
        if obj.end is None:
            return PartialCall(obj.name, obj.arguments if obj.name else "", False)
        rest = body[obj.end :]
        if obj.name is None or (rest.strip() and not END.startswith(rest[skip_ws(rest, 0) :])):
            return None
        return PartialCall(obj.name, obj.arguments, True)

    def call_format(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        tags = [
            tag(
                f'{BEGIN}\n{{"name": {json.dumps(t.name)}, "arguments": ',
                json_schema_format(t.parameters),
                f"}}\n{END}",
            )
            for t in tools
        ]
        return tags_format(tags, "\n", parallel)

    def format_calls(self, calls: Sequence[ToolCall]) -> str:
        return "\n".join(
            f'{BEGIN}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n{END}' for c in calls
        )


class Qwen25Parser(HermesParser):
    """Qwen 2.5's name for the same format (SGLang's ``qwen25``)."""

    name = "qwen25"
