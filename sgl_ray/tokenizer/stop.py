"""Stop-string and stop-regex detection on streamed text, without ever retracting emitted text."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import regex  # a dependency of transformers; unlike re, its searches take a timeout

logger = logging.getLogger(__name__)

REGEX_SEARCH_TIMEOUT_S = 0.05
"""A client's pattern could backtrack for minutes on the engine's thread: a search that takes longer than this drops
the pattern for the rest of the request (with a warning in the log)."""
MAX_HELD_REGEX_CHARS = 256
"""A stop regex whose matches are at most this long holds back that many characters minus one, so its cut is exact;
a longer (or unbounded) one holds nothing back and cuts no earlier than the text already released."""


class StopResult(NamedTuple):
    """What one ``StopChecker.feed`` releases: text safe to stream, and whether a stop string matched."""

    text: str
    stopped: bool


class StopChecker:
    """Finds stop strings in text that arrives in deltas, trimming at the first one.

    Invariants, for any split of the output text ``T`` into deltas:

    * ``"".join(emitted) + flush()`` is ``T`` cut at the first stop-string occurrence: before it, or after it
      with ``no_stop_trim``; all of ``T`` if none occurs. The result does not depend on the split.
    * Emitted text is never retracted: the tail of ``T`` that is a proper prefix of some stop string is held
      back (the longest such suffix) and released once it can no longer become one.

    "First occurrence" is the one that *ends* first, ties going to the longer string: that is the stop a
    character-by-character stream would hit first, so the cut is the same however the text was chunked
    (stops ``["abcd", "c"]`` on ``"xabcd"`` cut at ``"xab"``; ``["ab", "b"]`` on ``"xab"`` cut at ``"x"``).

    Cost per ``feed`` is O((held + delta) * number of stop strings), with ``held < max stop length``: an
    occurrence that ends in the new delta cannot start before the held tail, or a longer suffix of the
    earlier text would have been a stop-string prefix.

    ``stop_regexes`` (SGLang's ``stop_regex``) end the text at the first match of a pattern in the text so far,
    searched each time a delta arrives (so a pattern anchored with ``$`` matches at the end of the text at that
    moment), and cut it like a stop string; :attr:`matched` is then the pattern. Among stop strings and patterns,
    the match that ends first wins. A pattern whose matches have a bounded length ``w`` (at most
    :data:`MAX_HELD_REGEX_CHARS`) holds back ``w - 1`` characters, so no match can begin in released text; any
    other pattern cuts no earlier than the text already released.

    Example::

        >>> checker = StopChecker(["</s>"])
        >>> checker.feed("Hello <"), checker.feed("/s> tail")
        (StopResult(text='Hello ', stopped=False), StopResult(text='', stopped=True))
        >>> StopChecker(None, stop_regexes=["[0-9]+[.]"]).feed("Step 12. Then")
        StopResult(text='Step ', stopped=True)
    """

    def __init__(
        self,
        stop_strings: Sequence[str] | None,
        no_stop_trim: bool = False,
        stop_regexes: Sequence[str] | None = None,
    ) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop_strings or () if s))
        self._prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))
        self._max_held = max((len(s) for s in self._stops), default=1) - 1
        self._no_stop_trim = no_stop_trim
        self._held = ""
        self._matched: str | None = None
        self._regexes = _RegexStops(stop_regexes) if stop_regexes else None

    @property
    def stopped(self) -> bool:
        """Whether a stop string has matched; later feeds release nothing."""
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, if any."""
        return self._matched

    @property
    def held(self) -> str:
        """Text received but not yet released (a possible start of a stop string)."""
        return self._held

    def feed(self, delta: str) -> StopResult:
        """Take the next piece of output text; return what can be streamed now and whether to stop."""
        if self._matched is not None:
            return StopResult("", True)
        text = self._held + delta
        hit = self._first_occurrence(text)
        if self._regexes is not None:
            found = self._regexes.search(text, len(self._held))
            if found is not None and (hit is None or (found[1], found[0]) < (hit[0] + len(hit[1]), hit[0])):
                start, end, pattern = found
                self._matched, self._held = pattern, ""
                return StopResult(text[:end] if self._no_stop_trim else text[:start], True)
        if hit is not None:
            start, stop = hit
            self._matched, self._held = stop, ""
            return StopResult(text[: start + len(stop)] if self._no_stop_trim else text[:start], True)
        held = self._longest_prefix_suffix(text)
        if self._regexes is not None:
            held = max(held, min(len(text), self._regexes.hold))
        self._held = text[len(text) - held :] if held else ""
        return StopResult(text[: len(text) - held], False)

    def flush(self) -> str:
        """Release the held-back tail: call once when the request ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return held

    def _first_occurrence(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _longest_prefix_suffix(self, text: str) -> int:
        for size in range(min(len(text), self._max_held), 0, -1):
            if text[len(text) - size :] in self._prefixes:
                return size
        return 0


class _RegexStops:
    """The stop patterns of one request and the text they are searched in (everything fed so far)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self._patterns = [(p, regex.compile(p)) for p in dict.fromkeys(patterns)]
        widths = [_max_width(p) for p, _ in self._patterns]
        self._bounded = all(w is not None for w in widths)
        self._width = max((w or 0 for w in widths), default=0)
        self.hold = max(self._width - 1, 0) if self._bounded else 0
        self._seen = ""  # text fed before the current one, up to the held tail

    def search(self, text: str, held: int) -> tuple[int, int, str] | None:
        """The first-ending match in everything fed so far, as ``(start, end, pattern)`` relative to ``text`` (the
        held tail plus the new delta; ``held`` of its characters were fed before). A match that starts in
        released text is clamped to ``text``'s start: released text is never retracted."""
        released = self._seen[: len(self._seen) - held] if held else self._seen
        full = released + text
        # A new match ends in the new delta or (lookarounds, anchors) just before it, so it starts no earlier
        # than one match width before it; an unbounded pattern must look at everything.
        pos = max(0, len(released) - self._width) if self._bounded else 0
        best: tuple[int, int, str] | None = None
        for pattern, compiled in list(self._patterns):
            try:
                m = compiled.search(full, pos, timeout=REGEX_SEARCH_TIMEOUT_S)
            except TimeoutError:
                logger.warning(
                    "stop_regex %r took over %ss on one search: dropped", pattern, REGEX_SEARCH_TIMEOUT_S
                )
                self._patterns.remove((pattern, compiled))
                continue
            if m is not None and (best is None or (m.end(), m.start()) < (best[1], best[0])):
                best = (m.start(), m.end(), pattern)
        self._seen = full
        if best is None:
            return None
        start, end, pattern = best
        base = len(released)
        return max(start - base, 0), max(end - base, 0), pattern


def _max_width(pattern: str) -> int | None:
    """The longest match ``pattern`` can have, if bounded by :data:`MAX_HELD_REGEX_CHARS`, else None."""
    try:
        from re import _parser  # type: ignore[attr-defined]

        _, high = _parser.parse(pattern).getwidth()
    except Exception:  # syntax only the regex module knows, or another Python's internals: unbounded
        return None
    return high if high <= MAX_HELD_REGEX_CHARS else None
