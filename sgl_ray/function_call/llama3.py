"""Llama 3.1 / 3.2 JSON calls: ``{"name": ..., "parameters": {...}}``, either the whole output (after whitespace)
or after ``<|python_tag|>``; several calls are separated by ``;``."""

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

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"


class Llama3Parser(ToolCallParser):
    """Calls are read where the output starts with ``{`` or after ``<|python_tag|>``. An object that is not a
    call of a known function (a JSON answer, say) is content from there on."""

    name = "llama3"
    template_markers = (PYTHON_TAG, '"parameters": dictionary of argument name')
    needs_special_tokens = True  # <|python_tag|> is a special token

    def scan(self, text: str) -> Scan:
        first = skip_ws(text, 0)
        if first == len(text):  # only whitespace so far: an object may follow
            return Scan("", [], text, 0)
        if text[first] == "{":
            return self._calls(text, "", first)
        start = text.find(PYTHON_TAG)
        if start < 0:
            held = held_marker(text, 0, PYTHON_TAG)
            return Scan(text[:held], [], text[held:], 0)
        return self._calls(text, text[:start], start + len(PYTHON_TAG))

    def _calls(self, text: str, before: str, pos: int) -> Scan:
        """The ``;``-separated calls from ``pos``; ``before`` is the content ahead of them."""
        calls: list[PartialCall] = []
        region = len(before)
        while True:
            try:
                obj = scan_call_object(text, pos)
            except InvalidJSON:
                obj = None
            if obj is None or (obj.name is not None and not self.known(obj.name)):
                return self._not_calls(text, before, calls, region, pos)
            if obj.end is None:
                calls.append(PartialCall(obj.name, obj.arguments if obj.name else "", False))
                return Scan(before, calls, text[region:], len(calls))
            if obj.name is None:
                return self._not_calls(text, before, calls, region, pos)
            calls.append(PartialCall(obj.name, obj.arguments, True))
            pos = skip_ws(text, obj.end)
            if pos == len(text):
                return Scan(before, calls, text[region:], len(calls))
            if text[pos] != SEPARATOR:  # the calls ended: the rest is content
                return Scan(before + text[pos:], calls)
            pos += 1

    @staticmethod
    def _not_calls(text: str, before: str, calls: list[PartialCall], region: int, pos: int) -> Scan:
        if calls:  # the valid calls before the bad one stand; the rest is content
            return Scan(before + text[pos:], calls)
        return Scan(before + text[region:], [])

    def call_format(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        tags = [
            tag(f'{{"name": {json.dumps(t.name)}, "parameters": ', json_schema_format(t.parameters), "}")
            for t in tools
        ]
        return tags_format(tags, SEPARATOR + " ", parallel)

    def format_calls(self, calls: Sequence[ToolCall]) -> str:
        return (SEPARATOR + " ").join(
            f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls
        )
