"""Stop-string detection on streamed text, without ever retracting emitted text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


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

    Example::

        >>> checker = StopChecker(["</s>"])
        >>> checker.feed("Hello <"), checker.feed("/s> tail")
        (StopResult(text='Hello ', stopped=False), StopResult(text='', stopped=True))
    """

    def __init__(self, stop_strings: Sequence[str] | None, no_stop_trim: bool = False) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop_strings or () if s))
        self._prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))
        self._max_held = max((len(s) for s in self._stops), default=1) - 1
        self._no_stop_trim = no_stop_trim
        self._held = ""
        self._matched: str | None = None

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
        if hit is not None:
            start, stop = hit
            self._matched, self._held = stop, ""
            return StopResult(text[: start + len(stop)] if self._no_stop_trim else text[:start], True)
        held = self._longest_prefix_suffix(text)
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
