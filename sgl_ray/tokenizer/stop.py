"""Stop-string and stop-regex detection on streamed text, without ever retracting emitted text."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import NamedTuple

import regex  # a dependency of transformers; unlike re, its searches take a timeout

from sgl_ray.tokenizer.stop_matcher import shared_matcher

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

    Stop strings are matched by an Aho-Corasick automaton built once per tuple of stop strings and shared by
    every checker of that tuple (all the sequences of a request): its tables are linear in the total length of
    the stop strings, and a checker keeps only its state in it and the held tail (``held < max stop length``).
    Cost per ``feed`` is O(delta) automaton steps, amortized, plus copying the held tail: an occurrence that ends
    in the new delta cannot start before the held tail, or a longer suffix of the earlier text would have been a
    stop-string prefix.

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

    __slots__ = ("_held", "_matched", "_matcher", "_no_stop_trim", "_regexes", "_state")

    def __init__(
        self,
        stop_strings: Sequence[str] | None,
        no_stop_trim: bool = False,
        stop_regexes: Sequence[str] | None = None,
    ) -> None:
        stops = tuple(dict.fromkeys(s for s in stop_strings or () if s))
        self._matcher = shared_matcher(stops) if stops else None
        self._state = 0  # matcher node: the longest suffix of the text so far that starts a stop string
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
        hit: tuple[int, str] | None = None
        held = 0
        if self._matcher is not None:
            self._state, found_at, stop = self._matcher.scan(self._state, delta)
            if stop is not None:
                hit = (len(self._held) + found_at + 1 - len(stop), stop)
            else:
                held = self._matcher.depth[self._state]
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
        if self._regexes is not None:
            held = max(held, min(len(text), self._regexes.hold))
        self._held = text[len(text) - held :] if held else ""
        return StopResult(text[: len(text) - held], False)

    def flush(self) -> str:
        """Release the held-back tail: call once when the request ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return held


class _RegexStops:
    """The stop patterns of one request, and as much of the text fed so far as they can still need.

    Each search finds, for each pattern, its first (leftmost) match in the whole text fed so far, as if searched
    from the start every time; the first-ending of those wins. The text so far has no match yet (else the request
    would have stopped), so a new match must end in the new delta, or just before it with an assertion (a
    lookahead, ``$``, ``\\b``) that looks into it: for a pattern whose matches have a bounded length ``w`` and whose
    lookarounds see a bounded distance ("windowed", see :func:`_extent`), it starts at most ``w`` plus its lookahead
    reach (plus a margin) before the delta, so searching from there gives the same first match. That search also
    reads the text its lookbehinds (and ``\\b``) see before that start, plus one more character, so that ``^`` and
    ``\\A`` never mistake the window's first character for the start of the text. So a request whose patterns are
    all windowed keeps and searches O(window + delta) characters per feed, however long the output grows.

    A pattern that is not windowed (unbounded matches such as ``[0-9]+``, an unbounded lookaround, or syntax only
    the ``regex`` module knows) is searched over the whole text fed so far on every feed, as an unbounded pattern
    always was: O(text so far) time per feed (quadratic over a long stream), and all of the text is kept (O(output)
    memory per sequence) for as long as such a pattern is in the request.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self._patterns = [(p, regex.compile(p), _extent(p)) for p in dict.fromkeys(patterns)]
        widths = [_max_width(p) for p in dict.fromkeys(patterns)]
        self._bounded = all(w is not None for w in widths)
        self._width = max((w or 0 for w in widths), default=0)
        self.hold = max(self._width - 1, 0) if self._bounded else 0
        self._total = 0  # characters fed so far
        self._start = 0  # where in them ``_kept`` starts
        self._kept = ""  # the end of the text fed so far: all that a later search can read
        self._keep = self._keep_chars()

    def _keep_chars(self) -> int | None:
        """How many of the last characters fed the patterns can still need: the largest window, None for all."""
        if any(ext is None for _, _, ext in self._patterns):
            return None
        return max((ext.window for _, _, ext in self._patterns if ext is not None), default=0)

    def search(self, text: str, held: int) -> tuple[int, int, str] | None:
        """The first-ending match in everything fed so far, as ``(start, end, pattern)`` relative to ``text`` (the
        held tail plus the new delta; ``held`` of its characters were fed before). A match that starts in
        released text is clamped to ``text``'s start: released text is never retracted."""
        delta = text[held:]
        boundary = self._total  # where the delta starts in the text fed so far
        # The window: from the earliest character any pattern can read (all of the text for one not windowed).
        window_start = 0 if self._keep is None else max(0, boundary - self._keep)
        window = self._kept[window_start - self._start :] + delta
        best: tuple[int, int, str] | None = None
        for entry in list(self._patterns):
            pattern, compiled, ext = entry
            pos = 0 if ext is None else max(0, boundary - ext.lead)
            try:
                m = compiled.search(window, max(pos - window_start, 0), timeout=REGEX_SEARCH_TIMEOUT_S)
            except TimeoutError:
                logger.warning(
                    "stop_regex %r took over %ss on one search: dropped", pattern, REGEX_SEARCH_TIMEOUT_S
                )
                self._patterns.remove(entry)
                self._keep = self._keep_chars()
                continue
            if m is not None:
                start, end = m.start() + window_start, m.end() + window_start
                if best is None or (end, start) < (best[1], best[0]):
                    best = (start, end, pattern)
        self._total = boundary + len(delta)
        # No earlier than the window's start: the kept text only ever shrinks to what the patterns still need.
        keep_from = 0 if self._keep is None else max(0, self._total - self._keep)
        self._start, self._kept = keep_from, window[keep_from - window_start :]
        if best is None:
            return None
        start, end, pattern = best
        base = boundary - held  # where ``text`` starts
        return max(start - base, 0), max(end - base, 0), pattern


class _Extent(NamedTuple):
    """How far a windowed pattern reaches from the start of a new delta (see :class:`_RegexStops`)."""

    lead: int
    """A new match starts at most this many characters before the delta: its longest match plus its lookahead
    reach, plus 2 (``$``, ``\\b`` and ``\\B`` look at the next character, or whether there is one)."""
    window: int
    """The characters before the delta its search reads: ``lead`` plus its lookbehind reach, plus 2 (``\\b`` looks
    one character back, and one more keeps ``^`` and ``\\A`` off the window's first character)."""


@functools.lru_cache(maxsize=256)
def _extent(pattern: str) -> _Extent | None:
    """How far a new match of ``pattern`` reaches from the start of a new delta, if its matches and lookarounds
    each stay within :data:`MAX_HELD_REGEX_CHARS`, else None (search all of the text). A lookaround's reach is
    bounded by the sum of the longest matches of all the lookarounds in that direction (nested or not)."""
    try:
        from re import _constants, _parser  # type: ignore[attr-defined]

        parsed = _parser.parse(pattern)
        _, high = parsed.getwidth()
        reach = {1: 0, -1: 0}  # lookahead, lookbehind
        todo: list = [parsed]
        while todo:
            node = todo.pop()
            if isinstance(node, _parser.SubPattern):
                for op, av in node.data:
                    if op in (_constants.ASSERT, _constants.ASSERT_NOT):
                        direction, sub = av
                        reach[1 if direction > 0 else -1] += sub.getwidth()[1]
                    todo.append(av)
            elif isinstance(node, (list, tuple)):
                todo.extend(node)
    except Exception:  # syntax only the regex module knows, or another Python's internals: not windowed
        return None
    if max(high, reach[1], reach[-1]) > MAX_HELD_REGEX_CHARS:
        return None
    lead = high + reach[1] + 2
    return _Extent(lead, lead + reach[-1] + 2)


def _max_width(pattern: str) -> int | None:
    """The longest match ``pattern`` can have, if bounded by :data:`MAX_HELD_REGEX_CHARS`, else None."""
    try:
        from re import _parser  # type: ignore[attr-defined]

        _, high = _parser.parse(pattern).getwidth()
    except Exception:  # syntax only the regex module knows, or another Python's internals: unbounded
        return None
    return high if high <= MAX_HELD_REGEX_CHARS else None
