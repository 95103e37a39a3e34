"""DeepSeek V3: calls between ``<｜tool▁calls▁begin｜>`` and ``<｜tool▁calls▁end｜>``, each one
``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>`` (V3.1's
``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`` is read too)."""

from __future__ import annotations

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
from sgl_ray.function_call.json_scan import InvalidJSON, escape_controls, loads, skip_ws, value_end

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
FENCE_OPEN, FENCE_CLOSE = "```json\n", "\n```"


class _NotACall(Exception):
    pass


class DeepSeekV3Parser(ToolCallParser):
    """A calls block that is not made of valid calls of known functions is content."""

    name = "deepseekv3"
    template_markers = (CALLS_BEGIN,)

    def scan(self, text: str) -> Scan:
        start = text.find(CALLS_BEGIN)
        if start < 0:
            held = held_marker(text, 0, CALLS_BEGIN)
            return Scan(text[:held], [], text[held:], 0)
        before = text[:start]
        calls: list[PartialCall] = []
        pos = start + len(CALLS_BEGIN)
        try:
            while True:
                pos = skip_ws(text, pos)
                rest = text[pos:]
                if text.startswith(CALLS_END, pos):
                    return Scan(before + text[pos + len(CALLS_END) :], calls)
                if not rest or CALLS_END.startswith(rest) or CALL_BEGIN.startswith(rest):
                    return Scan(before, calls, text[start:], len(calls))
                if not text.startswith(CALL_BEGIN, pos):
                    raise _NotACall
                call, pos = self._call(text, pos + len(CALL_BEGIN))
                calls.append(call)
                if pos < 0:
                    return Scan(before, calls, text[start:], len(calls))
        except _NotACall:
            return Scan(before + text[start:], []) if not calls else Scan(before + text[pos:], calls)

    def _call(self, text: str, pos: int) -> tuple[PartialCall, int]:
        """The call whose body starts at ``pos`` and the position after it (-1 if it is still arriving)."""
        sep = text.find(SEP, pos)
        if sep < 0:
            if "\n" in text[pos:] or "{" in text[pos:]:
                raise _NotACall
            return PartialCall(None, "", False), -1
        kind = text[pos:sep]
        body = sep + len(SEP)
        if kind == "function":  # V3: NAME\n```json\n{...}\n```
            newline = text.find("\n", body)
            if newline < 0:
                return PartialCall(None, "", False), -1
            name, args = text[body:newline], newline + 1
            if not self.known(name):
                raise _NotACall
            if not text.startswith(FENCE_OPEN, args):
                if FENCE_OPEN.startswith(text[args:]):
                    return PartialCall(name, "", False), -1
                raise _NotACall
            args += len(FENCE_OPEN)
            closing = FENCE_CLOSE + CALL_END
        else:  # V3.1: NAME<｜tool▁sep｜>{...}
            name, args, closing = kind, body, CALL_END
            if not self.known(name):
                raise _NotACall
        args = skip_ws(text, args)
        if args < len(text) and text[args] != "{":
            raise _NotACall
        try:
            end = value_end(text, args)
        except InvalidJSON:
            raise _NotACall from None
        if end is None:
            return PartialCall(name, escape_controls(text[args:]), False), -1
        arguments = escape_controls(text[args:end])
        try:
            loads(arguments)
        except InvalidJSON:
            raise _NotACall from None
        if text.startswith(closing, end):
            return PartialCall(name, arguments, True), end + len(closing)
        if closing.startswith(text[end:]):
            return PartialCall(name, arguments, True), -1
        raise _NotACall

    def call_format(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        calls = [
            tag(
                f"{CALL_BEGIN}function{SEP}{t.name}\n{FENCE_OPEN}",
                json_schema_format(t.parameters),
                FENCE_CLOSE + CALL_END,
            )
            for t in tools
        ]
        return tag(CALLS_BEGIN, tags_format(calls, "\n", parallel), CALLS_END)

    def format_calls(self, calls: Sequence[ToolCall]) -> str:
        body = "\n".join(
            f"{CALL_BEGIN}function{SEP}{c.name}\n{FENCE_OPEN}{c.arguments}{FENCE_CLOSE}{CALL_END}"
            for c in calls
        )
        return f"{CALLS_BEGIN}{body}{CALLS_END}"
