"""Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` — a JSON array of calls after the
``[TOOL_CALLS]`` token, after optional plain text."""

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

BEGIN = "[TOOL_CALLS]"


class MistralParser(ToolCallParser):
    """One array of calls after ``[TOOL_CALLS]`` (a single object without the array is read too). An array that
    is not all valid calls of known functions is content."""

    name = "mistral"
    template_markers = (BEGIN,)
    needs_special_tokens = True  # [TOOL_CALLS] is a control token

    def scan(self, text: str) -> Scan:
        start = text.find(BEGIN)
        if start < 0:
            held = held_marker(text, 0, BEGIN)
            return Scan(text[:held], [], text[held:], 0)
        before = text[:start]
        pos = skip_ws(text, start + len(BEGIN))
        if pos == len(text):
            return Scan(before, [], text[start:], 0)
        single = text[pos] == "{"
        if not single:
            if text[pos] != "[":
                return Scan(text, [])
            pos += 1
        calls: list[PartialCall] = []
        while True:
            try:
                obj = scan_call_object(text, pos, ("arguments",))
            except InvalidJSON:
                return _not_calls(text, before, calls, pos)
            if obj.name is not None and not self.known(obj.name):
                return _not_calls(text, before, calls, pos)
            if obj.end is None:
                calls.append(PartialCall(obj.name, obj.arguments if obj.name else "", False))
                return Scan(before, calls, text[start:], len(calls))
            if obj.name is None:
                return _not_calls(text, before, calls, pos)
            calls.append(PartialCall(obj.name, obj.arguments, True))
            pos = skip_ws(text, obj.end)
            if pos == len(text):
                return Scan(before, calls, text[start:], len(calls))
            if single or text[pos] == "]":
                return Scan(before + text[pos + (0 if single else 1) :], calls)
            if text[pos] != ",":
                return _not_calls(text, before, calls, pos)
            pos += 1

    def call_format(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        calls = [
            tag(f'{{"name": {json.dumps(t.name)}, "arguments": ', json_schema_format(t.parameters), "}")
            for t in tools
        ]
        return tag(f"{BEGIN} [", tags_format(calls, ", ", parallel), "]")

    def format_calls(self, calls: Sequence[ToolCall]) -> str:
        items = ", ".join(f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls)
        return f"{BEGIN} [{items}]"


def _not_calls(text: str, before: str, calls: list[PartialCall], pos: int) -> Scan:
    """The array went wrong at ``pos``: the valid calls before it stand, the rest is content (all of it when there
    were none)."""
    return Scan(before + text[pos:], calls) if calls else Scan(text, [])
