"""NGRAM draft trees: what followed the request's suffix before, in its own text and in an engine-wide n-gram
cache (SGLang's NGRAM options and their meaning).

**The cache** is a trie of the n-grams (up to ``branch_length`` tokens) of every request's output, with the last
``branch_length - 1`` tokens of its prompt before it (what SGLang's cache takes in), shared by all requests of the
engine. Each node is one n-gram: its token follows its parent's n-gram; it counts how often it was seen and when
last. A request keeps *cursors*: the nodes of the n-grams that end at its newest token, so each new token adds or
refreshes at most ``branch_length`` nodes. Past ``capacity`` nodes, the least recently seen n-grams are dropped
(down to 80%), each with the longer ones continuing it.

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
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from sgl_ray.speculative.ngram import continuation, ngram_matches

_Add = Callable[[int, int], "int | None"]  # (parent row, token) -> the node's row; None: no room
_OWN_OCCURRENCES = (
    8  # a request's own earlier occurrences of a suffix that its tree draws on (the most recent)
)


class _Node:
    __slots__ = ("token", "parent", "children", "freq", "depth", "seen")

    def __init__(self, token: int, parent: _Node | None, depth: int) -> None:
        self.token = token
        self.parent = parent  # None once dropped from the cache
        self.children: dict[int, _Node] = {}
        self.freq = 0
        self.depth = depth  # the n-gram's length (root: 0)
        self.seen = 0  # when it was last seen (the cache's clock)


class NgramCache:
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
        self.root = _Node(-1, None, 0)
        self.num_nodes = 0  # every node but the root
        self._clock = 0

    def extend(self, cursors: list[_Node], tokens: Iterable[int]) -> list[_Node]:
        """Record ``tokens`` appended after a request's earlier tokens (``cursors``: the nodes of the n-grams
        ending at its newest token, as the last call returned; ``[]`` for none). Returns the new cursors."""
        limit = self.branch_length
        root = self.root
        for t in tokens:
            t = int(t)
            self._clock += 1
            clock = self._clock
            nxt = []
            for node in itertools.chain(cursors, (root,)):
                if node.depth >= limit or (node.parent is None and node is not root):
                    continue  # as long as an n-gram gets, or dropped
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = _Node(t, node, node.depth + 1)
                    self.num_nodes += 1
                child.freq += 1
                child.seen = clock
                nxt.append(child)
            cursors = nxt
        if self.num_nodes > self.capacity:
            self._evict()
        return cursors

    def _evict(self) -> None:
        """Drop the least recently seen n-grams (each with the longer ones continuing it) down to 80% of the
        capacity: one walk over the cache every fifth of its capacity in new nodes."""
        nodes = []
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            nodes.append(n)
            stack.extend(n.children.values())
        nodes.sort(key=lambda n: n.seen)
        target = self.capacity * 4 // 5
        for n in nodes:
            if self.num_nodes <= target:
                break
            if n.parent is None:  # already gone with an ancestor
                continue
            n.parent.children.pop(n.token, None)
            gone = [n]
            while gone:
                g = gone.pop()
                g.parent = None
                self.num_nodes -= 1
                gone.extend(g.children.values())
                g.children = {}

    def _anchors(self, tokens: Sequence[int]) -> dict[int, _Node]:
        """{w: node} for each suffix of ``w`` tokens the cache has and knows continuations of."""
        out = {}
        for w in range(min(len(tokens), self.max_window), self.min_window - 1, -1):
            node: _Node | None = self.root
            for t in tokens[len(tokens) - w :]:
                node = node.children.get(int(t))
                if node is None:
                    break
            if node is not None and node.children:
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
                grow(own, w, add, full)
            if w in cached and not full():
                grow(cached[w], w, add, full)
            if full():
                break
        return nodes, parents

    def _grow_by_recency(self, anchor: _Node, w: int, add: _Add, full: Callable[[], bool]) -> None:
        scale = (self.max_breadth - self.min_breadth) / (self.max_window - self.min_window + 1)
        queue = deque([(0, (self.max_window - w) * scale + self.min_breadth, anchor)])
        while queue and not full():
            row, breadth, node = queue.popleft()
            recent = sorted(node.children.values(), key=lambda c: c.seen, reverse=True)
            for child in recent[: max(1, int(breadth))]:
                at = add(row, child.token)
                if at is None:
                    continue
                queue.append((at, breadth - scale, child))

    def _grow_by_frequency(self, anchor: _Node, w: int, add: _Add, full: Callable[[], bool]) -> None:
        order = itertools.count()  # ties: the order they were found
        heap: list[tuple[float, int, int, _Node]] = []

        def push(row: int, node: _Node, prob: float) -> None:
            best = heapq.nlargest(self.max_breadth, node.children.values(), key=lambda c: c.freq)
            total = sum(c.freq for c in best) or 1
            for c in best:
                heapq.heappush(heap, (-prob * c.freq / total, next(order), row, c))

        push(0, anchor, 1.0)
        while heap and not full():
            neg, _, row, node = heapq.heappop(heap)
            at = add(row, node.token)
            if at is not None:
                push(at, node, -neg)


def _continuations(tokens: np.ndarray, ends: np.ndarray, depth: int) -> _Node:
    """A trie of what followed the occurrences ending at ``ends`` (most recent first), ``depth`` tokens each (a run
    that reaches the end of ``tokens`` repeats), as the cache's nodes: ``seen`` is the occurrence's end."""
    root = _Node(-1, None, 0)
    for e in ends.tolist():
        node = root
        for t in continuation(tokens, e, depth):
            child = node.children.get(t)
            if child is None:
                child = node.children[t] = _Node(t, node, node.depth + 1)
                child.seen = e
            child.freq += 1
            node = child
    return root
