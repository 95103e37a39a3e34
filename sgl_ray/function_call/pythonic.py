"""Pythonic calls (Llama 3.2 / Llama 4 style): a Python list of calls with keyword arguments,
``[get_weather(city="Paris"), get_time(zone="CET")]``, after optional plain text.

Argument values are Python literals; JSON's ``true``/``false``/``null`` are read too (the constrained format
writes values as JSON). A list is held back until it closes, then sent whole: its calls stream as one piece each.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

from sgl_ray.function_call.base import (
    PartialCall,
    Scan,
    Tool,
    ToolCall,
    ToolCallParser,
    json_schema_format,
    tag,
    tags_format,
)

_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
_MAYBE_START = re.compile(r"\[\s*([A-Za-z_][\w.]*\s*)?\Z")
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_CLOSERS = {"[": "]", "(": ")", "{": "}"}


class _NotACall(Exception):
    pass


class PythonicParser(ToolCallParser):
    """A list that does not parse as calls of known functions with literal keyword arguments is content."""

    name = "pythonic"
    template_markers = ("[func_name1(", "<|python_start|>")

    def scan(self, text: str) -> Scan:
        content: list[str] = []
        calls: list[PartialCall] = []
        pos = 0
        while True:
            start = text.find("[", pos)
            if start < 0:
                content.append(text[pos:])
                return Scan("".join(content), calls)
            content.append(text[pos:start])
            if not _START.match(text, start):
                if _MAYBE_START.match(text, start):  # "[get_wea": may still become a call list
                    return Scan("".join(content), calls, text[start:], 0)
                content.append("[")
                pos = start + 1
                continue
            end = _list_end(text, start)
            if end is None:
                return Scan("".join(content), calls, text[start:], 0)
            try:
                calls += [PartialCall(c.name, c.arguments, True) for c in self._parse_list(text[start:end])]
            except _NotACall:
                content.append(text[start:end])
            pos = end

    def _parse_list(self, source: str) -> list[ToolCall]:
        try:
            tree = ast.parse(source, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            raise _NotACall from None
        if not isinstance(tree, ast.List) or not tree.elts:
            raise _NotACall
        out = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or node.args:
                raise _NotACall
            name = _dotted(node.func)
            if not self.known(name) or any(kw.arg is None for kw in node.keywords):
                raise _NotACall
            try:
                args = {kw.arg: _literal(kw.value) for kw in node.keywords}
                arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
            except (RecursionError, ValueError):  # nested too deep, NaN
                raise _NotACall from None
            out.append(ToolCall(name, arguments))
        return out

    def call_format(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        calls = [tag(f"{t.name}(", _kwargs_format(t.parameters), ")") for t in tools]
        return tag("[", tags_format(calls, ", ", parallel), "]")

    def format_calls(self, calls: Sequence[ToolCall]) -> str:
        def call(c: ToolCall) -> str:
            try:
                args = json.loads(c.arguments)
            except json.JSONDecodeError:
                args = {}
            args = args if isinstance(args, dict) else {}
            return f"{c.name}({', '.join(f'{k}={json.dumps(v)}' for k, v in args.items())})"

        return "[" + ", ".join(call(c) for c in calls) + "]"


def _list_end(text: str, start: int) -> int | None:
    """End (exclusive) of the bracketed list at ``text[start]``, skipping brackets inside string literals."""
    closers: list[str] = []
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                return None
            i = j + 1
            continue
        if c in _CLOSERS:
            closers.append(_CLOSERS[c])
        elif closers and c == closers[-1]:
            closers.pop()
            if not closers:
                return i + 1
        i += 1
    return None


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _NotACall
        return {str(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _NotACall from None
    if not isinstance(value, (str, int, float, bool)) and value is not None:
        raise _NotACall
    return value


def _kwargs_format(parameters: dict[str, Any]) -> dict[str, Any]:
    """``k=v, ...`` for an arguments schema: the required properties in order, then any optional ones (each value
    a JSON value of its property's schema)."""
    props: dict[str, Any] = parameters.get("properties") or {}
    required = [k for k in parameters.get("required") or [] if k in props]
    optional = [k for k in props if k not in required]

    def prop(key: str, lead: str) -> dict[str, Any]:
        return {
            "type": "sequence",
            "elements": [{"type": "const_string", "value": f"{lead}{key}="}, json_schema_format(props[key])],
        }

    def maybe(key: str) -> dict[str, Any]:
        return {"type": "optional", "content": prop(key, ", ")}

    if required:
        elements = (
            [prop(required[0], "")] + [prop(k, ", ") for k in required[1:]] + [maybe(k) for k in optional]
        )
        return {"type": "sequence", "elements": elements}
    starts = [
        {"type": "sequence", "elements": [prop(k, "")] + [maybe(o) for o in optional[i + 1 :]]}
        for i, k in enumerate(optional)
    ]
    return {"type": "optional", "content": {"type": "or", "elements": starts}} if starts else _EMPTY


_EMPTY: dict[str, Any] = {"type": "const_string", "value": ""}
