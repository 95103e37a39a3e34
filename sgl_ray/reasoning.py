"""Reasoning parsers: split a thinking model's ``<think>…</think>`` reasoning from its answer, whole or streamed.

Parsers (SGLang's ``--reasoning-parser`` names):

* ``think``: reasoning only where the output opens with ``<think>`` (after whitespace); otherwise all of it is
  the answer.
* ``qwen3``: the same (Qwen3 opens its thinking with ``<think>``; with ``enable_thinking: false`` its template
  closes an empty one in the prompt and the output is all answer).
* ``deepseek-r1``: the output starts inside the reasoning (DeepSeek-R1's template opens ``<think>`` in the prompt);
  a ``<think>`` the model writes anyway is skipped. Without ``</think>`` all of it is reasoning.

Whitespace right after ``<think>`` and after ``</think>`` is dropped. A reasoning block without its ``</think>`` (the
output was cut) is reasoning to the end.

:func:`after_reasoning` wraps a grammar (an xgrammar structural-tag format) so that it applies to the answer only:
free reasoning text first, then the constrained answer.

Example::

    >>> parser = get_reasoning_parser("deepseek-r1")()
    >>> parser.parse("Two plus two.</think>\\n\\nFour.")
    ReasoningSplit(reasoning='Two plus two.', content='Four.')
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

from sgl_ray.errors import InvalidRequestError

THINK_START, THINK_END = "<think>", "</think>"


class ReasoningSplit(NamedTuple):
    reasoning: str
    content: str


class ReasoningParser:
    """Generic ``<think>…</think>`` at the start of the output. Stateful when streaming: one per choice.

    States: ``start`` (deciding whether the output opens with the start marker), ``reasoning``, ``gap`` (dropping
    whitespace after the end marker), ``answer``. Text that may still be a marker is held back.
    """

    name: ClassVar[str] = "think"
    starts_in_reasoning: ClassVar[bool] = False

    def __init__(self) -> None:
        self._state = "start"
        self._buf = ""  # text not yet settled
        self._skip_ws = False

    def parse(self, text: str) -> ReasoningSplit:
        """The whole output (the same as feeding it in any pieces, then :meth:`flush`)."""
        parser = type(self)()
        a, b = parser.feed(text), parser.flush()
        return ReasoningSplit(a.reasoning + b.reasoning, a.content + b.content)

    def feed(self, delta: str) -> ReasoningSplit:
        self._buf += delta
        reasoning: list[str] = []
        content: list[str] = []
        while self._buf:
            if self._state == "start":
                text = self._buf.lstrip()
                if text.startswith(THINK_START):
                    self._buf, self._state, self._skip_ws = text[len(THINK_START) :], "reasoning", True
                elif THINK_START.startswith(text):  # blank, or a partial "<think>": undecided
                    break
                else:
                    self._state = "reasoning" if self.starts_in_reasoning else "answer"
                    if self._state == "reasoning":
                        self._skip_ws = True
            elif self._state == "reasoning":
                if self._skip_ws:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        break
                    self._skip_ws = False
                end = self._buf.find(THINK_END)
                if end >= 0:
                    reasoning.append(self._buf[:end])
                    self._buf, self._state = self._buf[end + len(THINK_END) :], "gap"
                    continue
                keep = _partial_suffix(self._buf, THINK_END)
                reasoning.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break
            elif self._state == "gap":
                self._buf = self._buf.lstrip()
                if self._buf:
                    self._state = "answer"
            else:
                content.append(self._buf)
                self._buf = ""
        return ReasoningSplit("".join(reasoning), "".join(content))

    def flush(self) -> ReasoningSplit:
        """The end of the output: what was held back (an undecided start is answer, a partial end marker is
        reasoning)."""
        text, self._buf = self._buf, ""
        if self._state == "reasoning":
            return ReasoningSplit(text.lstrip() if self._skip_ws else text, "")
        if self._state == "start" and self.starts_in_reasoning:
            return ReasoningSplit(text.strip(), "")
        return ReasoningSplit("", text if self._state != "gap" else "")

    @classmethod
    def reasoning_format(cls) -> dict[str, Any]:
        """The structural-tag format of the reasoning block (as this family writes it), including its end."""
        block = {
            "type": "tag",
            "begin": THINK_START,
            "content": {"type": "any_text"},
            "end": THINK_END,
        }
        if cls.starts_in_reasoning:  # "<think>" is in the prompt: the output is reasoning up to "</think>"
            block = {**block, "begin": ""}
        return block


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek-r1"
    starts_in_reasoning = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (ReasoningParser, Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered as ``name`` (``think``, ``qwen3``, ``deepseek-r1``)."""
    if name not in REASONING_PARSERS:
        raise InvalidRequestError(
            f"reasoning_parser: unknown parser {name!r}; known: {sorted(REASONING_PARSERS)}",
            param="reasoning_parser",
        )
    return REASONING_PARSERS[name]


def after_reasoning(parser: type[ReasoningParser], answer: dict[str, Any]) -> dict[str, Any]:
    """A structural tag: the reasoning block (optional unless the family starts in it), whitespace, then
    ``answer`` (a structural-tag format)."""
    gap = {"type": "regex", "pattern": r"[ \t\r\n]*"}
    thought = {"type": "sequence", "elements": [parser.reasoning_format(), gap, answer]}
    if parser.starts_in_reasoning:
        return {"type": "structural_tag", "format": thought}
    return {"type": "structural_tag", "format": {"type": "or", "elements": [thought, answer]}}


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
