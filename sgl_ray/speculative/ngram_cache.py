"""NGRAM draft trees: what followed the request's suffix before, in its own text and in an engine-wide n-gram
cache (SGLang's NGRAM options and their meaning).

**The cache** is a trie of the n-grams (up to ``branch_length`` tokens) of every request's output, with the last
``branch_length - 1`` tokens of its prompt before it (what SGLang's cache takes in), shared by all requests of the
engine. Each node is one n-gram: its token follows its parent's n-gram; it counts how often it was seen and when
last. A request keeps *cursors*: the nodes of the n-grams that end at its newest token, so each new token adds or
refreshes at most ``branch_length`` nodes. Past ``capacity`` nodes, the least recently used n-grams (an n-gram is
used when it or a longer one continuing it is seen) are dropped, down to 80%, each with the longer ones continuing
it; a request's cursors are then walked again from its last tokens (:attr:`NgramCache.epoch`).

**A draft tree** for a request (its tokens ``T``, room for ``N`` nodes, ``D`` deep): for each suffix length ``w``
from ``max_window`` down to ``min_window`` there are up to two *anchors*: the earlier places in ``T`` where its last
``w`` tokens occurred (the 8 most recent: what followed each of them, ``D`` tokens; a run that reaches the end of
``T`` repeats), and the cache's node for them. From each anchor in turn the tree grows by those continuations,
until it has ``N`` nodes:

* ``BFS`` (default): breadth first, each node taking its most recently seen children, ``b`` of them, ``b``
  starting at ``min_breadth`` after a match of ``max_window`` tokens and growing by ``s`` per token shorter
  match, shrinking by ``s`` per level down (at least one), ``s = (max_breadth - min_breadth) /
  (max_window - min_window + 1)``: a long match is trusted with one deep chain, a short one is ambiguous and gets
  a wide, shallow tree.
* ``PROB``: best first by the estimated probability of the path, each node's children (its ``max_breadth`` most
  frequent) weighted by their counts.

A token already under the same parent is merged, so the anchors extend one tree. Nodes come parents first.

Example::

    >>> cache = NgramCache(capacity=1000, branch_length=8, min_window=1, max_window=4, min_breadth=1, max_breadth=4)
    >>> tokens = np.array([5, 6, 7, 5, 6, 9, 5, 6])  # after "5 6": "9" (the most recent), then "7"
    >>> cache.draft_tree(tokens, max_nodes=4, max_depth=4)
    ([9, 7, 5, 5], [0, 0, 1, 2])
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from sgl_ray.speculative.ngram import continuation, ngram_matches

_Add = Callable[[int, int], "int | None"]  # (parent row, token) -> the node's row; None: no room
_OWN_OCCURRENCES = (
    8  # a request's own earlier occurrences of a suffix that its tree draws on (the most recent)
)


class _Node:
    """A node of a request's own continuations (:func:`_continuations`), a few dozen per tree."""

    __slots__ = ("token", "children", "freq", "seen")

    def __init__(self, token: int) -> None:
        self.token = token
        self.children: dict[int, _Node] = {}
        self.freq = 0
        self.seen = 0  # the end of the latest occurrence it continues


_KEY = 1 << 32  # a child's key: parent * _KEY + token
_DEAD = -2  # the parent of a dropped node (its id is free for a new one)
Kid = tuple[int, int, int, Any]  # (token, seen, freq, handle): a child as the tree's growth reads it


class NgramCache:
    """Nodes are ids into flat arrays (token, parent, count, last seen, length, first child, next sibling) and one
    dict from ``parent * 2**32 + token`` to the child: about 160 bytes a node, and nothing the garbage collector has
    to walk. Node 0 is the root (the empty n-gram)."""

    def __init__(
        self,
        capacity: int,
        branch_length: int,
        min_window: int,
        max_window: int,
        min_breadth: int,
        max_breadth: int,
        match_type: str = "BFS",
    ) -> None:
        self.capacity = capacity
        self.branch_length = branch_length
        self.min_window, self.max_window = min_window, max_window
        self.min_breadth, self.max_breadth = min_breadth, max_breadth
        self.match_type = match_type
        self._child: dict[int, int] = {}
        self._token = array("q", [-1])
        self._parent = array("q", [-1])
        self._freq = array("q", [0])
        self._seen = array("q", [0])
        self._depth = array("q", [0])
        self._first = array("q", [-1])  # first child, -1: none
        self._sibling = array("q", [-1])  # next child of the same parent, -1: none
        self._free: list[int] = []
        self.num_nodes = 0  # every node but the root
        self.epoch = 0  # counts evictions: cursors from an earlier epoch may name dropped (or reused) ids
        self._clock = 0

    def extend(self, cursors: list[int], tokens: Iterable[int]) -> list[int]:
        """Record ``tokens`` appended after a request's earlier tokens (``cursors``: the nodes of the n-grams
        ending at its newest token, as the last call returned in this :attr:`epoch`; ``[]`` for none). Returns the
        new cursors."""
        limit = self.branch_length
        child, depth, freq, seen = self._child, self._depth, self._freq, self._seen
        for t in tokens:
            t = int(t)
            self._clock += 1
            clock = self._clock
            nxt = []
            for node in (*cursors, 0):
                if depth[node] >= limit:
                    continue  # as long as an n-gram gets
                c = child.get(node * _KEY + t)
                if c is None:
                    c = self._add(node, t)
                freq[c] += 1
                seen[c] = clock
                nxt.append(c)
            cursors = nxt
        if self.num_nodes > self.capacity:
            self._evict()  # the newest n-grams stay, but keep only cursors that did
            cursors = [c for c in cursors if self._parent[c] != _DEAD]
        return cursors

    def _add(self, parent: int, token: int) -> int:
        fields = (token, parent, 0, 0, self._depth[parent] + 1, -1, self._first[parent])
        arrays = (self._token, self._parent, self._freq, self._seen, self._depth, self._first, self._sibling)
        if self._free:
            n = self._free.pop()
            for a, v in zip(arrays, fields, strict=True):
                a[n] = v
        else:
            n = len(self._token)
            for a, v in zip(arrays, fields, strict=True):
                a.append(v)
        self._first[parent] = n
        self._child[parent * _KEY + token] = n
        self.num_nodes += 1
        return n

    def _kids(self, node: int) -> list[Kid]:
        out = []
        c = self._first[node]
        while c != -1:
            out.append((self._token[c], self._seen[c], self._freq[c], c))
            c = self._sibling[c]
        return out

    def _evict(self) -> None:
        """Drop the least recently used n-grams, each with the longer ones continuing it, down to 80% of the
        capacity (one pass over the cache every fifth of its capacity in new nodes, in numpy but for the dict)."""
        view = lambda a: np.frombuffer(a, dtype=np.int64)  # noqa: E731 - writable views, gone before any append
        parent, seen, depth, token = (
            view(self._parent),
            view(self._seen),
            view(self._depth),
            view(self._token),
        )
        first, sibling = view(self._first), view(self._sibling)
        live = np.flatnonzero(parent >= 0)
        live = live[live > 0]  # not the root
        # an n-gram was last used when it or a longer one continuing it was last seen, so an ancestor is never
        # older than its descendants; ties go deepest first: the oldest of that order hold whole subtrees
        used = seen.copy()
        for d in range(int(depth[live].max()), 1, -1):
            at = live[depth[live] == d]
            np.maximum.at(used, parent[at], used[at])
        excess = self.num_nodes - self.capacity * 4 // 5
        gone = live[np.lexsort((-depth[live], used[live]))[:excess]]
        drop = np.zeros(len(parent), dtype=bool)
        drop[gone] = True
        child = self._child
        for key in (parent[gone] * _KEY + token[gone]).tolist():
            del child[key]
        parent[gone] = _DEAD
        keep = live[~drop[live]]
        # children lists of what is left, rebuilt: each parent's kept children in a row, linked in that order
        keep = keep[np.argsort(parent[keep], kind="stable")]
        first[:] = -1
        sibling[gone] = -1
        owners = parent[keep]
        heads = np.ones(len(keep), dtype=bool)
        heads[1:] = owners[1:] != owners[:-1]
        first[owners[heads]] = keep[heads]
        nxt = np.full(len(keep), -1, dtype=np.int64)
        nxt[:-1] = np.where(heads[1:], -1, keep[1:])
        sibling[keep] = nxt
        del parent, seen, depth, token, first, sibling
        self._free.extend(gone.tolist())
        self.num_nodes -= len(gone)
        self.epoch += 1

    def _anchors(self, tokens: Sequence[int]) -> dict[int, int]:
        """{w: node} for each suffix of ``w`` tokens the cache has and knows continuations of."""
        out = {}
        child = self._child
        for w in range(min(len(tokens), self.max_window), self.min_window - 1, -1):
            node: int | None = 0
            for t in tokens[len(tokens) - w :]:
                node = child.get(node * _KEY + int(t))
                if node is None:
                    break
            if node is not None and self._first[node] != -1:
                out[w] = node
        return out

    def draft_tree(self, tokens: np.ndarray, max_nodes: int, max_depth: int) -> tuple[list[int], list[int]]:
        """A draft tree after ``tokens`` (a request's prompt and output, int64): (node tokens, parent rows),
        parents first, row 0 the request's newest token and node ``i`` at row ``i + 1``. Empty when nothing
        matched."""
        nodes: list[int] = []
        parents: list[int] = []
        depth = [0]  # by row
        kids: list[dict[int, int]] = [{}]  # by row: token -> row

        def add(parent_row: int, token: int) -> int | None:
            row = kids[parent_row].get(token)
            if row is not None:
                return row
            if len(nodes) >= max_nodes or depth[parent_row] >= max_depth:
                return None
            nodes.append(token)
            parents.append(parent_row)
            depth.append(depth[parent_row] + 1)
            kids.append({})
            row = len(nodes)
            kids[parent_row][token] = row
            return row

        def full() -> bool:
            return len(nodes) >= max_nodes

        if max_nodes <= 0 or max_depth <= 0:
            return nodes, parents
        ends, length = ngram_matches(tokens, self.max_window)
        cached = self._anchors(tokens)
        grow = self._grow_by_frequency if self.match_type == "PROB" else self._grow_by_recency
        own: _Node | None = None
        own_count = -1
        for w in range(self.max_window, self.min_window - 1, -1):
            occ = ends[length >= w]
            if len(occ):  # the request's own earlier occurrences (the most recent few)
                if len(occ) != own_count:  # (a longer suffix's occurrences are among a shorter one's)
                    own, own_count = _continuations(tokens, occ[::-1][:_OWN_OCCURRENCES], max_depth), len(occ)
                assert own is not None
                grow(own, _own_kids, w, add, full)
            if w in cached and not full():
                grow(cached[w], self._kids, w, add, full)
            if full():
                break
        return nodes, parents

    def _grow_by_recency(
        self, anchor: Any, kids: Callable[[Any], list[Kid]], w: int, add: _Add, full: Callable[[], bool]
    ) -> None:
        scale = (self.max_breadth - self.min_breadth) / (self.max_window - self.min_window + 1)
        queue = deque([(0, (self.max_window - w) * scale + self.min_breadth, anchor)])
        while queue and not full():
            row, breadth, node = queue.popleft()
            recent = sorted(kids(node), key=lambda k: k[1], reverse=True)
            for token, _, _, handle in recent[: max(1, int(breadth))]:
                at = add(row, token)
                if at is not None:
                    queue.append((at, breadth - scale, handle))

    def _grow_by_frequency(
        self, anchor: Any, kids: Callable[[Any], list[Kid]], w: int, add: _Add, full: Callable[[], bool]
    ) -> None:
        order = itertools.count()  # ties: the order they were found
        heap: list[tuple[float, int, int, int, Any]] = []

        def push(row: int, node: Any, prob: float) -> None:
            best = heapq.nlargest(self.max_breadth, kids(node), key=lambda k: k[2])
            total = sum(k[2] for k in best) or 1
            for token, _, count, handle in best:
                heapq.heappush(heap, (-prob * count / total, next(order), row, token, handle))

        push(0, anchor, 1.0)
        while heap and not full():
            neg, _, row, token, handle = heapq.heappop(heap)
            at = add(row, token)
            if at is not None:
                push(at, handle, -neg)


def _own_kids(node: _Node) -> list[Kid]:
    return [(c.token, c.seen, c.freq, c) for c in node.children.values()]


def _continuations(tokens: np.ndarray, ends: np.ndarray, depth: int) -> _Node:
    """A trie of what followed the occurrences ending at ``ends`` (most recent first), ``depth`` tokens each (a run
    that reaches the end of ``tokens`` repeats): ``seen`` is the latest occurrence a node continues."""
    root = _Node(-1)
    for e in ends.tolist():
        node = root
        for t in continuation(tokens, e, depth):
            child = node.children.get(t)
            if child is None:
                child = node.children[t] = _Node(t)
                child.seen = e
            child.freq += 1
            node = child
    return root
