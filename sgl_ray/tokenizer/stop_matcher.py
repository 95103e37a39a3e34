"""Stop-string matching for :class:`~sgl_ray.tokenizer.stop.StopChecker`: one Aho-Corasick automaton per tuple of
stop strings, shared by every checker of that tuple (all the sequences of a request)."""

from __future__ import annotations

import functools
import re
import weakref
from array import array

_UNKNOWN = -2
"""A failure link or match of a :class:`StopMatcher` node not computed yet."""


class StopMatcher:
    """An Aho-Corasick automaton over one request's stop strings, shared by all its checkers.

    A node is a prefix of some stop string; a checker's state is the node of the longest suffix of its text that
    is one. Node ``(i, d)`` (the first ``d`` characters of stop ``i``, ``1 <= d <= len(stop i)``) has the index
    ``base[i] + d - 1``, 0 is the root (the empty prefix); a prefix shared with an earlier stop string uses the
    earlier one's node, leaving its own index unused. Every table is a flat array indexed by node, so memory is
    linear in the total length of the stop strings:

    * ``_next[n]``: the character that continues node ``n`` along its own stop string (to node ``n + 1``), or a
      character no stop string contains where that string ends;
    * ``_branches[n]``: the other children of ``n`` (``{char: node}``), where a later stop string diverges; the
      root's children are ``_root``;
    * ``_fail[n]``: the node of the longest proper suffix of ``n``'s text that is also a node;
    * ``depth[n]``: the length of ``n``'s text;
    * ``_match[n]``: the longest stop string that is a suffix of ``n``'s text (its index), or -1.

    ``_first`` matches any character that starts a stop string: from the root, a scan skips ahead to the next one.
    The trie is built up front; failure links and matches are filled in the first time a scan needs them
    (:data:`_UNKNOWN` until then), so building costs little beyond copying the strings, and a text that never
    goes deep into a stop string never pays for the deep nodes. Filling in is idempotent, so checkers (even on
    different threads) may share one matcher.
    """

    __slots__ = (
        "__weakref__",
        "_branches",
        "_fail",
        "_first",
        "_match",
        "_next",
        "_parents",
        "_root",
        "depth",
        "stops",
    )

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        sentinel = _unused_char(set().union(*stops))
        self._next = sentinel + "".join(s[1:] + sentinel for s in stops)
        self.depth = array("i", [0])
        for s in stops:
            self.depth.extend(range(1, len(s) + 1))
        size = len(self.depth)
        self._root: dict[str, int] = {}
        self._branches: dict[int, dict[str, int]] = {}
        self._fail = array("i", [_UNKNOWN]) * size
        self._match = array("i", [_UNKNOWN]) * size
        self._fail[0], self._match[0] = 0, -1
        # The parent of a stop string's first own node; any other node's is the one before it.
        self._parents: dict[int, int] = {}
        # Insert the strings: each one follows the trie as far as it can, then branches off into its own nodes.
        base = 1
        for i, s in enumerate(stops):
            node, d = 0, 0
            while d < len(s):
                child = self._child(node, s[d])
                if child is None:
                    break
                node, d = child, d + 1
            if d == len(s):  # a prefix of an earlier stop string: ends on that one's node
                self._match[node] = i
            else:
                own = base + d  # node (i, d + 1)
                (self._root if node == 0 else self._branches.setdefault(node, {}))[s[d]] = own
                self._parents[own] = node
                if node == 0:
                    self._fail[own] = 0
                self._match[base + len(s) - 1] = i
            base += len(s)
        self._first = re.compile("[" + "".join(re.escape(c) for c in self._root) + "]")

    def _child(self, node: int, char: str) -> int | None:
        if node == 0:
            return self._root.get(char)
        if self._next[node] == char:
            return node + 1
        branches = self._branches.get(node)
        return None if branches is None else branches.get(char)

    def _fail_of(self, node: int) -> int:
        """``node``'s failure link, filling in those it depends on (its ancestors', and those of the shallower
        nodes its search passes) with an explicit stack: the chains can be as deep as the longest stop string."""
        fail = self._fail
        if fail[node] != _UNKNOWN:
            return fail[node]
        stack = [[node, _UNKNOWN]]  # [node, where its search for a suffix stands (_UNKNOWN: not started)]
        while stack:
            entry = stack[-1]
            node, state = entry
            if state == _UNKNOWN:
                parent = self._parents.get(node, node - 1)
                state = fail[parent]
                if state == _UNKNOWN:
                    stack.append([parent, _UNKNOWN])
                    continue
            # The node's text less its first character, read from ``state`` (a suffix of the parent's text).
            char = self._next[node - 1]
            while True:
                if state == 0:
                    found = self._root.get(char, 0)
                    break
                child = self._child(state, char)
                if child is not None:
                    found = child
                    break
                if fail[state] == _UNKNOWN:
                    entry[1] = state
                    stack.append([state, _UNKNOWN])
                    found = _UNKNOWN
                    break
                state = fail[state]
            if found != _UNKNOWN:
                fail[node] = found
                stack.pop()
        return fail[node]

    def _match_of(self, node: int) -> int:
        """The index of the longest stop string ending ``node``'s text, or -1 (filling in along its failure
        chain)."""
        match = self._match
        chain = []
        while match[node] == _UNKNOWN:
            chain.append(node)
            node = self._fail_of(node)
        found = match[node]
        for node in chain:
            match[node] = found
        return found

    def scan(self, state: int, text: str) -> tuple[int, int, str | None]:
        """Advance ``state`` over ``text`` up to the first character at which a stop string ends: returns the new
        state, that character's index in ``text`` and the (longest) stop string ending there, or
        ``(state, -1, None)`` after all of ``text``."""
        nxt, branches, root, fail, match = self._next, self._branches, self._root, self._fail, self._match
        i, size = 0, len(text)
        while i < size:
            if state == 0:  # skip to the next character that can start a stop string
                found = self._first.search(text, i)
                if found is None:
                    return 0, -1, None
                i = found.start()
                state = root[text[i]]
            else:
                char = text[i]
                while True:
                    if nxt[state] == char:
                        state += 1
                        break
                    children = branches.get(state)
                    if children is not None and char in children:
                        state = children[char]
                        break
                    suffix = fail[state]
                    state = suffix if suffix != _UNKNOWN else self._fail_of(state)
                    if state == 0:
                        state = root.get(char, 0)
                        break
            stop = match[state]
            if stop == _UNKNOWN:
                stop = self._match_of(state)
            if stop >= 0:
                return state, i, self.stops[stop]
            i += 1
        return state, -1, None


def _unused_char(used: set[str]) -> str:
    """A character outside ``used``, no wider than its widest one (so a string of both is no wider)."""
    widest = ord(max(used))
    for top in (0xFF, 0xFFFF, 0x10FFFF):
        if widest <= top:
            for code in range(top, -1, -1):
                if chr(code) not in used:
                    return chr(code)
    raise ValueError("the stop strings use every character")


@functools.lru_cache(maxsize=16)
def _recent_matcher(stops: tuple[str, ...]) -> StopMatcher:
    return StopMatcher(stops)


_live_matchers: weakref.WeakValueDictionary[tuple[str, ...], StopMatcher] = weakref.WeakValueDictionary()


def shared_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """The matcher for ``stops``, built once and shared by every checker that uses it (all the sequences of a
    request, and requests with the same stop strings): the last few built stay cached, and one stays alive as long
    as any checker holds it."""
    matcher = _live_matchers.get(stops)
    if matcher is None:
        matcher = _live_matchers[stops] = _recent_matcher(stops)
    return matcher
