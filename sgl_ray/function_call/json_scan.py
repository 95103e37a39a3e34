"""Scanning JSON that may still be arriving: where a value ends, and the parts of a call object read so far.

Invariant: every answer depends only on the text scanned, and a longer text never contradicts a shorter one — a
value that is complete in a prefix is complete (with the same end) in every extension, a prefix found invalid stays
invalid. The streaming tool-call parsers rely on this to re-scan the whole output after each delta.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

WHITESPACE = " \t\n\r"
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("+-.eE0123456789")
_LITERALS = ("true", "false", "null")
_ESCAPES = frozenset('"\\/bfnrtu')
ARGUMENT_KEYS = ("arguments", "parameters")


class InvalidJSON(ValueError):
    """The text is not a prefix of any JSON value."""


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


_CONTROL = re.compile(r"[\x00-\x1f]")


def string_end(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON string opening at ``text[i]`` (a ``"``), or None if the text ends inside it."""
    i += 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] not in _ESCAPES:
                raise InvalidJSON(f"bad escape at {i}")
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1  # raw control characters are let through (see escape_controls)
    return None


def escape_controls(text: str) -> str:
    """``text`` (JSON, or the start of it) with each raw control character inside a string written as its
    ``\\u00XX`` escape: JSON forbids them there, and some grammars let a model write them. A prefix of the text
    maps to a prefix of the result, so streamed argument pieces stay consistent with the whole."""
    if not _CONTROL.search(text):
        return text
    out, in_string, escaped = [], False, False
    for c in text:
        if in_string and not escaped and c < " ":
            out.append(f"\\u{ord(c):04x}")
            continue
        out.append(c)
        if escaped:
            escaped = False
        elif c == "\\" and in_string:
            escaped = True
        elif c == '"':
            in_string = not in_string
    return "".join(out)


def _scalar_end(text: str, i: int) -> int | None:
    n = len(text)
    for lit in _LITERALS:
        if text.startswith(lit, i):
            return i + len(lit)
        if lit.startswith(text[i:]):
            return None
    j = i
    while j < n and text[j] in _NUMBER_CHARS:
        j += 1
    if j == i:
        raise InvalidJSON(f"unexpected {text[i]!r} at {i}")
    if j == n:  # digits may still follow; an incomplete prefix like "-" or "1e" too
        return None
    if not _NUMBER.fullmatch(text, i, j):
        raise InvalidJSON(f"bad number {text[i:j]!r} at {i}")
    return j


def value_end(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON value starting at ``text[i]`` (leading whitespace skipped), or None when the text
    ends before the value does. Raises :class:`InvalidJSON` when the text cannot be the start of a JSON value."""
    closers: list[str] = []  # expected closing brackets, innermost last
    n = len(text)
    state = "value"  # value | first_value (after "[") | key | first_key (after "{") | colon | after
    while True:
        i = skip_ws(text, i)
        if i >= n:
            return None
        c = text[i]
        if state in ("value", "first_value"):
            if state == "first_value" and c == "]":
                closers.pop()
                i += 1
                state = "after"
            elif c == "{":
                closers.append("}")
                i += 1
                state = "first_key"
            elif c == "[":
                closers.append("]")
                i += 1
                state = "first_value"
            elif c == '"':
                end = string_end(text, i)
                if end is None:
                    return None
                i, state = end, "after"
            else:
                end = _scalar_end(text, i)
                if end is None:
                    return None
                i, state = end, "after"
        elif state in ("key", "first_key"):
            if state == "first_key" and c == "}":
                closers.pop()
                i += 1
                state = "after"
            elif c == '"':
                end = string_end(text, i)
                if end is None:
                    return None
                i, state = end, "colon"
            else:
                raise InvalidJSON(f"expected a key at {i}")
        elif state == "colon":
            if c != ":":
                raise InvalidJSON(f"expected ':' at {i}")
            i, state = i + 1, "value"
        if state == "after":
            if not closers:
                return i
            i = skip_ws(text, i)
            if i >= n:
                return None
            c = text[i]
            if c == closers[-1]:
                closers.pop()
                i += 1
                if not closers:
                    return i
            elif c == ",":
                i += 1
                state = "key" if closers[-1] == "}" else "value"
            else:
                raise InvalidJSON(f"expected ',' or {closers[-1]!r} at {i}")


class CallObject(NamedTuple):
    """A call object ``{"name": ..., "arguments": {...}}`` read from a text that may end inside it.

    ``end`` is set once the object is complete. ``arguments`` is the raw JSON text of the arguments read so far:
    while an object value is arriving, everything up to the end of the text; a string value (arguments encoded as
    a JSON string) only once complete, decoded; ``"{}"`` for a complete object without arguments.
    """

    end: int | None
    name: str | None
    arguments: str


def scan_call_object(text: str, i: int, arg_keys: tuple[str, ...] = ARGUMENT_KEYS) -> CallObject:
    """Read the call object starting at ``text[i]`` (after whitespace). Raises :class:`InvalidJSON` when it is not
    a JSON object, when its name is not a string, or its arguments neither an object nor a string."""
    n = len(text)
    i = skip_ws(text, i)
    if i >= n:
        return CallObject(None, None, "")
    if text[i] != "{":
        raise InvalidJSON(f"expected '{{' at {i}")
    i += 1
    name: str | None = None
    arguments = ""
    first = True
    while True:
        i = skip_ws(text, i)
        if i >= n:
            return CallObject(None, name, arguments)
        if text[i] == "}":
            return CallObject(i + 1, name, arguments or "{}")
        if not first:
            if text[i] != ",":
                raise InvalidJSON(f"expected ',' or '}}' at {i}")
            i = skip_ws(text, i + 1)
            if i >= n:
                return CallObject(None, name, arguments)
        if text[i] != '"':
            raise InvalidJSON(f"expected a key at {i}")
        key_end = string_end(text, i)
        if key_end is None:
            return CallObject(None, name, arguments)
        key = loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= n:
            return CallObject(None, name, arguments)
        if text[i] != ":":
            raise InvalidJSON(f"expected ':' at {i}")
        i = skip_ws(text, i + 1)
        if i >= n:
            return CallObject(None, name, arguments)
        end = value_end(text, i)
        if key in arg_keys:
            if end is None:
                return CallObject(None, name, escape_controls(text[i:]) if text[i] == "{" else "")
            arguments = _arguments_text(text[i:end])
        elif end is None:
            return CallObject(None, name, arguments)
        elif key == "name":
            value = loads(text[i:end])
            if not isinstance(value, str):
                raise InvalidJSON("a call's name must be a string")
            name = value
        i, first = end, False


def _arguments_text(raw: str) -> str:
    if raw.startswith("{"):
        raw = escape_controls(raw)
        loads(raw)  # the scan does not check what follows "\u"
        return raw
    if raw.startswith('"'):
        inner = escape_controls(loads(raw))
        if isinstance(loads(inner), dict):
            return inner
    if raw == "null":
        return "{}"
    raise InvalidJSON("a call's arguments must be an object")


def loads(text: str) -> Any:
    """``json.loads`` whose every failure is :class:`InvalidJSON` (the scanner does not check escapes); raw
    control characters inside strings are read as themselves."""
    try:
        return json.loads(text, strict=False)
    except (json.JSONDecodeError, RecursionError):
        raise InvalidJSON(f"not valid JSON: {text[:40]!r}") from None
