"""The tool-call parser seam: one class per model family's call format, chosen by name or from a chat template.

A parser turns a model's output text into plain ``content`` and tool calls, whole or as it streams, and describes
its own call format as an xgrammar structural tag so that ``tool_choice="required"`` or a named function can force
the output into it. Adding a family is one module with a :class:`ToolCallParser` subclass, registered in
:mod:`sgl_ray.function_call.registry`.

How streaming works: :meth:`ToolCallParser.scan` reads the whole text so far; :meth:`ToolCallParser.feed` re-scans
after each delta and sends what is new since the last scan (content characters, a call's name, more argument
characters). That is sound because a scan of a longer text never contradicts a scan of its prefix (the contract of
``scan``), and cheap because outputs are short.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

from sgl_ray.constrained.base import compiler_message
from sgl_ray.errors import InvalidRequestError


class Tool(NamedTuple):
    """One function the model may call: its name and the JSON schema of its arguments object."""

    name: str
    parameters: dict[str, Any]


class ToolCall(NamedTuple):
    """A parsed call: the function's name and its arguments as JSON text (an object)."""

    name: str
    arguments: str


class ToolCallDelta(NamedTuple):
    """A streamed piece of call ``index``: its ``name`` on the first piece of that call, later pieces add
    ``arguments`` text. The pieces of a call concatenate to its :class:`ToolCall`."""

    index: int
    name: str | None
    arguments: str


class ParsedText(NamedTuple):
    content: str
    calls: list[ToolCall]


class StreamDelta(NamedTuple):
    content: str
    calls: list[ToolCallDelta]


class PartialCall(NamedTuple):
    """A call as far as it has been read. ``name`` is set only for a function of the request's tools;
    ``complete`` means the arguments object is complete."""

    name: str | None
    arguments: str
    complete: bool


class Scan(NamedTuple):
    """What :meth:`ToolCallParser.scan` found.

    ``content``: the settled text outside calls (a region that turned out not to be a valid call is content).
    ``calls``: settled calls (complete and valid), then the calls of the region still open at the end of the text.
    ``open_text``: the raw text of that open region (a call still arriving, or the start of a marker), "" if none.
    ``open_calls``: how many of ``calls`` are in the open region.
    """

    content: str
    calls: list[PartialCall]
    open_text: str = ""
    open_calls: int = 0


class ToolCallParser(ABC):
    """Parses one choice's output. Stateful when streaming: use one instance per choice.

    Contract of :meth:`scan`: for a text ``t`` and any prefix ``p`` of it, ``scan(p).content`` is a prefix of
    ``scan(t).content``, and every named call of ``scan(p)`` is in ``scan(t)`` at the same index with the same name
    and with arguments that start with ``scan(p)``'s. Calls are read only for functions in ``tools``.

    Example::

        >>> from sgl_ray.function_call import Tool, get_tool_call_parser
        >>> parser = get_tool_call_parser("qwen25")([Tool("f", {"type": "object"})])
        >>> parser.parse('Sure.<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
        ParsedText(content='Sure.', calls=[ToolCall(name='f', arguments='{"x": 1}')])
    """

    name: ClassVar[str]
    template_markers: ClassVar[tuple[str, ...]] = ()  # any of these in a chat template selects this parser
    needs_special_tokens: ClassVar[bool] = False  # the call markers are special tokens: keep them in the text

    def __init__(self, tools: Sequence[Tool], max_calls: int | None = None) -> None:
        self.tools = {t.name: t for t in tools}
        self.max_calls = max_calls
        self._text = ""
        self._content_sent = 0
        self._args_sent: list[int] = []  # per emitted call: argument characters sent

    # --- what a family implements ----------------------------------------------------------------------------
    @abstractmethod
    def scan(self, text: str) -> Scan:
        """Read ``text`` (the whole output so far); see the class contract."""

    @abstractmethod
    def call_format(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        """The structural-tag format (xgrammar's JSON shape) of one or more calls (one only unless ``parallel``)
        of ``tools``, with arguments that match each tool's schema, and nothing else."""

    @abstractmethod
    def format_calls(self, calls: Sequence[ToolCall]) -> str:
        """``calls`` written as this family writes them (for templates that do not render ``tool_calls``)."""

    @classmethod
    def detect_template(cls, template: str) -> bool:
        return any(marker in template for marker in cls.template_markers)

    # --- shared ------------------------------------------------------------------------------------------------
    def structural_tag(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        """The structural tag that forces the output into calls of ``tools`` (the ``structural_tag`` grammar)."""
        return {"type": "structural_tag", "format": self.call_format(tools, parallel)}

    def known(self, name: Any) -> bool:
        return isinstance(name, str) and name in self.tools

    def parse(self, text: str) -> ParsedText:
        """The whole output: calls that are complete and valid; everything else is content."""
        s = self.scan(text)
        settled = len(s.calls) - s.open_calls
        opened = s.calls[settled:]
        if opened and all(c.complete and c.name for c in opened):  # e.g. a closing marker never came
            content, calls = s.content, s.calls
        elif s.calls and s.open_text.isspace():  # whitespace after the calls
            content, calls = s.content, s.calls
        else:
            content, calls = s.content + s.open_text, s.calls[:settled]
        calls = calls[: self.max_calls] if self.max_calls is not None else calls
        return ParsedText(content, [ToolCall(c.name, c.arguments) for c in calls if c.name])

    def feed(self, delta: str) -> StreamDelta:
        """The content and call pieces that ``delta`` (the next output text) settles."""
        self._text += delta
        return self._diff(self.scan(self._text), final=False)

    def flush(self) -> StreamDelta:
        """At the end of the output: what is still held back. An open region whose name was already sent stays a
        (possibly incomplete) call; one that was not is content."""
        return self._diff(self.scan(self._text), final=True)

    def _diff(self, s: Scan, final: bool) -> StreamDelta:
        content, calls = s.content, s.calls
        if final:
            settled = len(calls) - s.open_calls
            opened = calls[settled:]
            committed = len(self._args_sent) > settled
            if not committed and not (opened and all(c.complete and c.name for c in opened)):
                if not (calls and s.open_text.isspace()):
                    content, calls = content + s.open_text, calls[:settled]
        if self.max_calls is not None:
            calls = calls[: self.max_calls]
        new_content = content[self._content_sent :] if len(content) > self._content_sent else ""
        self._content_sent = max(self._content_sent, len(content))
        pieces: list[ToolCallDelta] = []
        for index, call in enumerate(calls):
            if call.name is None:
                break
            if index == len(self._args_sent):
                pieces.append(ToolCallDelta(index, call.name, ""))
                self._args_sent.append(0)
            sent = self._args_sent[index]
            if len(call.arguments) > sent:
                pieces.append(ToolCallDelta(index, None, call.arguments[sent:]))
                self._args_sent[index] = len(call.arguments)
        return StreamDelta(new_content, pieces)


def held_marker(text: str, start: int, marker: str) -> int:
    """Where a trailing partial ``marker`` begins in ``text[start:]`` (``len(text)`` if none): text from there on
    may still become the marker, so it is not content yet."""
    for k in range(max(start, len(text) - len(marker) + 1), len(text)):
        if marker.startswith(text[k:]):
            return k
    return len(text)


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The structural-tag format of a JSON value matching ``schema``, written compactly (``", "`` and ``": "``
    between items, no other whitespace, as the grammar backend writes JSON): the model spends no tokens on layout.
    Raises :class:`~sgl_ray.errors.InvalidRequestError` for a schema the grammar compiler rejects."""
    import xgrammar as xgr

    try:
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidRequestError(
            f"Invalid JSON schema in 'tools': {compiler_message(e)}", param="tools"
        ) from None
    return {"type": "grammar", "grammar": str(grammar)}


def tags_format(
    tags: list[dict[str, Any]], separator: str, parallel: bool, *, at_least_one: bool = True
) -> dict[str, Any]:
    """One or more (one only unless ``parallel``) of ``tags`` with ``separator`` between them."""
    if not parallel:
        return tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    return {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": separator,
        "at_least_one": at_least_one,
        "stop_after_first": False,
    }


def tag(begin: str, content: dict[str, Any], end: str) -> dict[str, Any]:
    return {"type": "tag", "begin": begin, "content": content, "end": end}
