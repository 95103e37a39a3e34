"""NGRAM drafts: continue the request's text the way it went the last time it reached the same point.

Algorithm (host, numpy, per request and step): let ``T`` be the request's tokens (prompt + output) and ``s`` its
suffix of ``n`` tokens. Among the earlier places ``T[e - n + 1 .. e]`` that equal ``s`` (``e < len(T) - 1``), take
one with the longest ``n`` in ``[min_window, max_window]``, the most recent among those, and propose the tokens
that followed it: ``T[e + 1], T[e + 2], ...``. When that run reaches the end of ``T`` (a repeating pattern closer
than ``k`` tokens), the proposal continues with its own tokens, i.e. the pattern repeats::

    T:  ... a b c d x y ... a b c d          suffix "a b c d" (n = 4) matched at e
                    ^ e+1: drafts are "x y ..."

Candidates are the positions whose token equals the last one; their match lengths grow one token back per pass,
so a step costs ``O(len(T) + candidates * max_window)`` numpy work and no model.
"""

from __future__ import annotations

import numpy as np


def ngram_drafts(tokens: np.ndarray, k: int, min_window: int = 1, max_window: int = 12) -> list[int]:
    """Up to ``k`` draft tokens following the longest recent repeat of the suffix of ``tokens`` (int64 [N]).

    Example::

        >>> ngram_drafts(np.array([5, 6, 7, 8, 9, 5, 6]), k=3)
        [7, 8, 9]
        >>> ngram_drafts(np.array([1, 2, 3]), k=3)  # no earlier occurrence of the last token
        []
    """
    ends, length = ngram_matches(tokens, max_window)
    if len(ends) == 0 or k <= 0:
        return []
    best = int(length.max())
    if best < min_window:
        return []
    e = int(ends[np.flatnonzero(length == best)[-1]])  # the most recent of the longest
    return continuation(tokens, e, k)


def ngram_matches(tokens: np.ndarray, max_window: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """The earlier places the suffix of ``tokens`` occurred: their last positions ``e`` (ascending) and how many
    tokens of the suffix each matches (1 .. ``max_window``)."""
    n = len(tokens)
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    last = tokens[-1]
    ends = np.flatnonzero(tokens[:-1] == last)  # [C] candidate ends of an earlier occurrence
    length = np.ones(len(ends), dtype=np.int64)  # match length of each candidate so far
    alive = np.ones(len(ends), dtype=bool)
    for j in range(1, min(max_window, n - 1)):
        if not alive.any():
            break
        back = ends - j
        ok = back >= 0
        alive &= ok
        alive[ok] &= tokens[back[ok]] == tokens[n - 1 - j]
        length += alive
    return ends, length


def continuation(tokens: np.ndarray, e: int, k: int) -> list[int]:
    """The ``k`` tokens after position ``e``; past the end of ``tokens`` the run repeats with its period (the
    pattern that brought the suffix back)."""
    n = len(tokens)
    period = n - 1 - e
    out: list[int] = []
    for j in range(k):
        pos = e + 1 + j
        out.append(int(tokens[pos]) if pos < n else out[j - period])
    return out
