"""The prefix cache of a model whose every layer attends within a sliding window of ``W`` tokens.

A query at position ``i`` reads keys ``i - W < j <= i`` only, so a running request needs the KV of its last
``W - 1`` positions and nothing older: the rest can be freed while it runs. The radix tree keeps its keys (token
ids) but may drop a node's KV: such a node is a *tombstone* (``dead``), still on the path to the nodes under it.

What changes against :class:`RadixCache` (same page rules, same namespaces):

* **Locks cover a range.** A request locks only the nodes of its path that hold KV its window still reads:
  ``lock(node, start)`` locks the path from ``node`` up through the first node that ends after ``start``, and
  returns the start of that topmost node (the request keeps it; ranges always begin at a node boundary, so a
  split of a locked node leaves both halves inside the range and ``lock_ref`` copies stay right). ``slide`` drops
  the nodes the window has left. Locks no longer nest along a path; a node is kept in the tree while it has
  children, whatever its lock.
* **Eviction** takes the least recently used live node with no lock: a leaf leaves the tree, an inner node
  becomes a tombstone. A tombstone leaf with no lock leaves the tree at once (it holds nothing).
* **A match is usable** only where the new tokens' windows find their keys: it ends at a node whose last
  ``W - 1`` positions (all of them, when the match is shorter) are live. Its ``slots`` are ``-1`` for tombstones
  (the runner's table gets slot 0 there, which no query reads).
* **Insertion** takes ``-1`` for positions the request freed: those become tombstones, and live slots offered
  for a tombstone revive it (the request's copies become the cache's; other duplicates are freed here).

Sizes: ``evictable_size`` and ``protected_size`` count live slots only.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

import numpy as np

from sgl_ray.mem_cache.allocator import PagedAllocator
from sgl_ray.mem_cache.base import CacheKey, MatchResult
from sgl_ray.mem_cache.radix_cache import RadixCache, TreeNode

_EMPTY = np.empty(0, dtype=np.int64)


class WindowNode(TreeNode):
    """A tree node that knows its first position and whether its KV is gone (``dead``: every value is -1)."""

    __slots__ = ("start", "dead")

    def __init__(self, key: np.ndarray, value: np.ndarray, parent: TreeNode | None, node_id: int) -> None:
        super().__init__(key, value, parent, node_id)
        self.start = 0 if parent is None else parent.start + len(parent.key)  # type: ignore[attr-defined]
        self.dead = False

    @property
    def end(self) -> int:
        return self.start + len(self.key)


class SWARadixCache(RadixCache):
    """Example::

    >>> cache = SWARadixCache(PagedAllocator(64, 4), window=8)
    >>> cache.insert_owned(CacheKey(list(range(16))), np.arange(4, 20), owned_from=0)
    >>> m = cache.match_prefix(CacheKey(list(range(16))))
    >>> cache.lock(m.node, 16 - 8 + 1)  # a request at 16 tokens reads positions 9..15: its one node, from 0
    0
    """

    def __init__(self, allocator: PagedAllocator, window: int, page_size: int | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        super().__init__(allocator, page_size)

    def _reset(self) -> None:
        super()._reset()
        self._candidates: set[WindowNode] = set()  # live, unlocked: what evict may take

    def _new_node(self, key: np.ndarray, value: np.ndarray, parent: TreeNode | None) -> WindowNode:
        return WindowNode(key, value, parent, next(self._ids))

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        assert isinstance(child, WindowNode)
        upper = super()._split(child, n)
        assert isinstance(upper, WindowNode)
        child.start = upper.end
        upper.dead = child.dead
        if not child.dead and child.lock_ref == 0:
            self._candidates.add(upper)
        return upper

    # ---- lookup ------------------------------------------------------------------------------------------------

    def match_prefix(self, key: CacheKey) -> MatchResult:
        """The longest usable cached prefix (see the module notes); tombstones' slots are -1."""
        _, matched, _ = self._walk(key, np.asarray(key.token_ids, dtype=np.int64))
        return window_match(self.root(key.extra_key), matched, self.window, lambda n: n.dead)

    # ---- locking a window's range ------------------------------------------------------------------------------

    def lock(self, node: TreeNode, start: int) -> int:
        """Lock the nodes from ``node`` up that end after position ``start``; returns the first position locked
        (the topmost locked node's start; ``node``'s end when none is). They must be live."""
        assert isinstance(node, WindowNode)
        if node.parent is None and len(node.key) and start < node.end:
            raise RuntimeError(f"lock of a node no longer in the tree (evicted or flushed): {node!r}")
        self._cut_at(node, start)
        top = node.end
        while node.parent is not None and node.end > start:
            if node.dead:
                raise RuntimeError(f"lock of a tombstone: {node!r} (its KV is gone)")
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
                self._candidates.discard(node)
            node.lock_ref += 1
            top = node.start
            node = node.parent  # type: ignore[assignment]
        return top

    def unlock(self, node: TreeNode, start: int, below: int | None = None) -> int:
        """Undo ``lock(node, ...)`` that returned ``start`` — only for the nodes ending at or before ``below``
        where that is given (the window moved past them). Returns the new first locked position."""
        assert isinstance(node, WindowNode)
        if node.parent is None or start >= node.end:
            return node.end  # nothing locked (a node out of the tree was unlocked before it left)
        if below is not None:
            self._cut_at(node, below)
        path: list[WindowNode] = []
        while node.parent is not None and node.end > start:
            path.append(node)
            node = node.parent  # type: ignore[assignment]
        top = path[0].end
        for n in path:
            if below is not None and n.end > below:
                top = n.start
                continue
            if n.lock_ref <= 0:
                raise RuntimeError(f"unlock of an unlocked node: {n!r}")
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._protected -= len(n.key)
                self._evictable += len(n.key)
                self._candidates.add(n)
        return top

    def _cut_at(self, node: WindowNode, position: int) -> None:
        """Split the node of ``node``'s path that holds ``position`` (cut down to a page) at it, so a lock range
        starting there need not cover the node's head (a whole prompt is often one node)."""
        position -= position % self.page_size
        while node.parent is not None and node.start >= position:
            node = node.parent  # type: ignore[assignment]
        if node.parent is not None and node.start < position < node.end:
            self._split(node, position - node.start)

    def inc_lock(self, node: TreeNode) -> None:
        self.lock(node, 0)

    def dec_lock(self, node: TreeNode) -> None:
        self.unlock(node, 0)

    # ---- insertion ---------------------------------------------------------------------------------------------

    def insert_owned(self, key: CacheKey, slots: np.ndarray, owned_from: int) -> None:
        """Cache ``slots`` (``-1``: freed) as the KV of ``key``, both cut to whole pages; positions before
        ``owned_from`` are the cache's already (the caller's copies of its slots or -1), the rest the caller's.
        The caller's live slots become the cache's where the tree lacks them or holds a tombstone; its other
        duplicates are freed."""
        tokens = np.asarray(key.token_ids, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) != len(tokens):
            raise ValueError(f"insert: {len(tokens)} tokens but {len(slots)} slots")
        node, matched, tokens = self._walk(key, tokens)
        pos = 0
        for m in list(matched):
            assert isinstance(m, WindowNode)
            n = len(m.key)
            offered = slots[pos : pos + n]
            own = np.arange(pos, pos + n) >= owned_from
            if m.dead:
                live = np.flatnonzero(own & (offered >= 0))
                if len(live):
                    first = int(live[0]) - int(live[0]) % self.page_size
                    if first > 0:  # only the tail is live (its head was freed): revive that part
                        self._split(m, first)
                        offered, pos, n = offered[first:], pos + first, n - first
                    self._revive(m, offered.copy())
            else:
                dup = own & (offered >= 0) & (offered != m.value)
                if dup.any():
                    self.allocator.free(offered[dup].copy())
            pos += n
        while pos < len(tokens):  # the rest: runs of freed and of live slots
            dead = slots[pos] < 0
            end = pos + 1
            while end < len(tokens) and (slots[end] < 0) == dead:
                end += 1
            end -= (end - pos) % self.page_size if end < len(tokens) else 0
            leaf = self._new_node(tokens[pos:end].copy(), slots[pos:end].copy(), node)
            leaf.last_access_time = next(self._clock)
            node.children[self._child_key(leaf.key)] = leaf
            if dead:
                leaf.value = np.full(len(leaf.key), -1, dtype=np.int64)
                leaf.dead = True
            else:
                self._evictable += len(leaf.key)
                self._candidates.add(leaf)
            node, pos = leaf, end
        if isinstance(node, WindowNode) and node.dead:
            self._prune(node)  # a key that ends freed holds nothing worth keeping

    def insert(self, key: CacheKey, slots: np.ndarray):  # noqa: ANN201 - see insert_owned
        raise NotImplementedError("SWARadixCache takes insert_owned (freed positions and owned ranges)")

    def _revive(self, node: WindowNode, value: np.ndarray) -> None:
        node.value, node.dead = value, False
        if node.lock_ref == 0:
            self._evictable += len(node.key)
            self._candidates.add(node)
        else:
            self._protected += len(node.key)

    # ---- eviction ----------------------------------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Least recently used live unlocked nodes first: leaves leave the tree, inner nodes become tombstones."""
        heap = [(n.last_access_time, n.id, n) for n in self._candidates]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            if node not in self._candidates:
                continue
            self.allocator.free(node.value)
            freed += len(node.value)
            self._evictable -= len(node.key)
            self._candidates.discard(node)
            node.value = np.full(len(node.key), -1, dtype=np.int64)
            node.dead = True
            self._prune(node)
        return freed

    def _prune(self, node: WindowNode) -> None:
        """Remove ``node`` and then its ancestors while each is an unlocked tombstone without children."""
        while node.parent is not None and node.dead and not node.children and node.lock_ref == 0:
            parent = node.parent
            del parent.children[self._child_key(node.key)]
            node.parent = None
            node = parent  # type: ignore[assignment]

    def flush(self) -> bool:
        if self._protected > 0:
            return False
        nodes = list(self._iter_nodes())
        values = [n.value for n in nodes if not n.dead]  # type: ignore[attr-defined]
        for node in nodes:
            node.parent = None
        if values:
            self.allocator.free(np.concatenate(values))
        self._reset()
        return True

    def check(self) -> None:
        """Assert the invariants (tests): sizes, candidates, node starts, tombstone values."""
        live_free = live_locked = 0
        for node in self._iter_nodes():
            assert isinstance(node, WindowNode) and node.parent is not None
            assert node.start == node.parent.start + len(node.parent.key)  # type: ignore[attr-defined]
            if node.dead:
                assert (node.value == -1).all() and node.lock_ref == 0 and node not in self._candidates
                assert node.children, f"a tombstone leaf stayed: {node!r}"
            elif node.lock_ref == 0:
                live_free += len(node.key)
                assert node in self._candidates
            else:
                live_locked += len(node.key)
        assert (live_free, live_locked) == (self._evictable, self._protected)
        assert all(n.parent is not None for n in self._candidates)


def window_match(
    root: TreeNode, matched: list[TreeNode], window: int, dead: Callable[[Any], bool]
) -> MatchResult:
    """The usable prefix of a walk's ``matched`` nodes: it ends at the deepest node whose last ``window - 1``
    positions have live KV (a run of live nodes since the last ``dead`` one, or since the root), with the
    slots of every node up to it."""
    best, run_start = -1, 0
    for i, node in enumerate(matched):
        if dead(node):
            run_start = node.end
        elif run_start == 0 or node.end - run_start >= window - 1:
            best = i
    if best < 0:
        return MatchResult(slots=_EMPTY.copy(), node=root)
    slots = np.concatenate([n.value for n in matched[: best + 1]])
    return MatchResult(slots=slots, node=matched[best])
