"""RadixAttention's prefix cache: a radix tree from token-id prefixes to the KV slots that hold them.

Tree invariants (``page_size`` = P):

* Every non-root node has a non-empty ``key`` whose length is a multiple of P, and a ``value`` of the same length
  (one KV slot per token). A node's full prefix is the concatenation of the keys on the path from its root.
* Children are keyed by their first page (the first token when P == 1, a tuple of P tokens otherwise), so siblings
  never share a first page and a lookup walks one child per step.
* Each ``CacheKey.extra_key`` has its own root; prefixes under different roots never match each other.
* ``lock_ref`` of a node >= ``lock_ref`` of each child (locking walks the whole path); roots are never counted.
* ``evictable_size`` + ``protected_size`` == total tokens in the tree; a node's tokens are protected iff its
  ``lock_ref`` > 0. ``_leaves`` is exactly the set of non-root, childless nodes with ``lock_ref == 0``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

import numpy as np

from sgl_ray.mem_cache.allocator import PagedAllocator
from sgl_ray.mem_cache.base import BasePrefixCache, CacheKey, InsertResult, MatchResult
from sgl_ray.mem_cache.prefix_hash import chain_seed

ChildKey = int | tuple[int, ...]

_EMPTY = np.empty(0, dtype=np.int64)


class TreeNode:
    """One edge of the radix tree: ``key[i]``'s KV lives in slot ``value[i]``. Roots have empty key and value."""

    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access_time", "id")

    def __init__(self, key: np.ndarray, value: np.ndarray, parent: TreeNode | None, node_id: int) -> None:
        self.key = key  # [n] int64 token ids
        self.value = value  # [n] int64 KV slots
        self.children: dict[ChildKey, TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access_time = 0  # logical clock; ties (same tick) break by `id`, i.e. creation order
        self.id = node_id

    def __repr__(self) -> str:
        head = self.key[:8].tolist()
        more = "…" if len(self.key) > 8 else ""
        return f"TreeNode(id={self.id}, key={head}{more}, len={len(self.key)}, lock={self.lock_ref})"


class RadixCache(BasePrefixCache):
    """Token radix tree over a :class:`PagedAllocator`'s slots, with LRU eviction of unlocked leaves.

    The cache owns the slots in its nodes' values and gives them back only through ``allocator.free`` (on
    ``evict`` and ``flush``). Only whole pages are cached; keys and slots are truncated to a multiple of
    ``page_size``.
    """

    def __init__(self, allocator: PagedAllocator, page_size: int | None = None) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size if page_size is None else page_size
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._reset()

    def _reset(self) -> None:
        self._roots: dict[str | None, TreeNode] = {}
        self._leaves: set[TreeNode] = set()
        self._evictable = 0
        self._protected = 0

    # ---- sizes -------------------------------------------------------------------------------------------------

    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def protected_size(self) -> int:
        return self._protected

    # ---- lookup and insertion -------------------------------------------------------------------------------------

    def root(self, extra_key: str | None = None) -> TreeNode:
        """The root of ``extra_key``'s namespace (created on first use)."""
        node = self._roots.get(extra_key)
        if node is None:
            node = self._roots[extra_key] = self._new_node(_EMPTY, _EMPTY, None)
        return node

    def match_prefix(self, key: CacheKey) -> MatchResult:
        node, matched, _ = self._walk(key, np.asarray(key.token_ids, dtype=np.int64))
        slots = np.concatenate([n.value for n in matched]) if matched else _EMPTY.copy()
        return MatchResult(slots=slots, node=node)

    def insert(self, key: CacheKey, slots: np.ndarray) -> InsertResult:
        """See the base class; ``slots`` must have one entry per token of ``key`` (both are then truncated)."""
        tokens = np.asarray(key.token_ids, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) != len(tokens):
            raise ValueError(f"insert: {len(tokens)} tokens but {len(slots)} slots")
        node, matched, tokens = self._walk(key, tokens)
        num_cached = sum(len(n.key) for n in matched)
        if num_cached < len(tokens):
            # Copy: the caller's arrays (e.g. a request's slot table row) may be reused after the insert.
            leaf = self._new_node(tokens[num_cached:].copy(), slots[num_cached : len(tokens)].copy(), node)
            leaf.last_access_time = next(self._clock)
            node.children[self._child_key(leaf.key)] = leaf
            self._leaves.discard(node)
            self._leaves.add(leaf)
            self._evictable += len(leaf.key)
            node = leaf
        return InsertResult(num_cached=num_cached, node=node)

    def _walk(self, key: CacheKey, tokens: np.ndarray) -> tuple[TreeNode, list[TreeNode], np.ndarray]:
        """Follow ``tokens`` (truncated to whole pages, returned) down from its root as far as the tree matches.

        Returns the deepest matched node and the matched path (root excluded). If the match ends inside a node,
        that node is split first so the returned node ends exactly at the match end. Every node on the path gets
        the same fresh access time.
        """
        ps = self.page_size
        tokens = tokens[: len(tokens) - len(tokens) % ps]
        node = self.root(key.extra_key)
        matched: list[TreeNode] = []
        now = next(self._clock)
        pos = 0
        while pos < len(tokens):
            child = node.children.get(self._child_key(tokens[pos:]))
            if child is None:
                break
            n = self._match_len(child.key, tokens[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access_time = now
            matched.append(child)
            node = child
            pos += n
        return node, matched, tokens

    def _new_node(self, key: np.ndarray, value: np.ndarray, parent: TreeNode | None) -> TreeNode:
        return TreeNode(key, value, parent, next(self._ids))

    def _child_key(self, tokens: np.ndarray) -> ChildKey:
        if self.page_size == 1:
            return int(tokens[0])
        return tuple(tokens[: self.page_size].tolist())

    def _match_len(self, a: np.ndarray, b: np.ndarray) -> int:
        """Length of the common prefix of ``a`` and ``b``, rounded down to whole pages."""
        m = min(len(a), len(b))
        diff = np.flatnonzero(a[:m] != b[:m])
        n = int(diff[0]) if len(diff) else m
        return n - n % self.page_size

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut ``child`` after ``n`` tokens; returns the new upper node. ``child`` keeps its identity (and so any
        handle to it still ends where it did), its children and leaf status; the upper node inherits its lock."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key) and n % self.page_size == 0
        upper = self._new_node(child.key[:n], child.value[:n], parent)
        upper.lock_ref = child.lock_ref
        upper.last_access_time = child.last_access_time
        child.key, child.value = child.key[n:], child.value[n:]
        child.parent = upper
        upper.children[self._child_key(child.key)] = child
        parent.children[self._child_key(upper.key)] = upper
        return upper

    # ---- locking ---------------------------------------------------------------------------------------------

    def inc_lock(self, node: TreeNode) -> None:
        if node.parent is None and len(node.key) > 0:
            raise RuntimeError(f"inc_lock on a node no longer in the tree (evicted or flushed): {node!r}")
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
                self._leaves.discard(node)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: TreeNode) -> None:
        if node.parent is None and len(node.key) > 0:
            raise RuntimeError(f"dec_lock on a node no longer in the tree (evicted or flushed): {node!r}")
        if node.parent is not None and node.lock_ref <= 0:
            raise RuntimeError(f"dec_lock on an unlocked node: {node!r}")
        while node.parent is not None:
            if node.lock_ref == 1:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
                if not node.children:
                    self._leaves.add(node)
            node.lock_ref -= 1
            node = node.parent

    # ---- eviction --------------------------------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Algorithm: a min-heap of the evictable leaves ordered by (last access, id). Pop the oldest, free its
        slots, detach it; if that leaves its parent childless and unlocked (and not a root), the parent joins the
        heap. Locked nodes are never leaves of the evictable set, so their ancestors are never reached."""
        heap = [(n.last_access_time, n.id, n) for n in self._leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            self.allocator.free(node.value)
            freed += len(node.value)
            parent = node.parent
            assert parent is not None
            del parent.children[self._child_key(node.key)]
            node.parent = None  # detached: a stale handle can no longer lock anything
            self._leaves.discard(node)
            self._evictable -= len(node.key)
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                self._leaves.add(parent)
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
        return freed

    def flush(self) -> bool:
        if self._protected > 0:
            return False
        nodes = list(self._iter_nodes())
        values = [n.value for n in nodes]
        for node in nodes:
            node.parent = None  # detached, as in evict
        if values:
            self.allocator.free(np.concatenate(values))
        self._reset()
        return True

    # ---- introspection ---------------------------------------------------------------------------------------

    def _iter_nodes(self) -> Iterator[TreeNode]:
        """Every non-root node, depth first, children in insertion order."""
        stack = [c for r in self._roots.values() for c in reversed(r.children.values())]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children.values()))

    def summary(self, block: int = 32) -> frozenset[int]:
        """Chained hashes (``mem_cache.prefix_hash``) of every ``block``-aligned prefix held in the tree: a
        compact, token-exact description of what is cached, for cache-aware routing. O(cached tokens)."""
        out: set[int] = set()
        stack: list[tuple[TreeNode, int, tuple[int, ...]]] = [
            (child, chain_seed(extra_key), ())
            for extra_key, root in self._roots.items()
            for child in root.children.values()
        ]
        while stack:
            node, h, pending = stack.pop()
            tokens = pending + tuple(node.key.tolist())
            full = len(tokens) - len(tokens) % block
            for start in range(0, full, block):
                h = hash((h, tokens[start : start + block]))
                out.add(h)
            rest = tokens[full:]
            stack.extend((child, h, rest) for child in node.children.values())
        return frozenset(out)

    def pretty(self, max_tokens: int = 8) -> str:
        """Indented dump of the tree (debugging)."""
        lines: list[str] = []

        def visit(node: TreeNode, depth: int) -> None:
            head = node.key[:max_tokens].tolist()
            more = "…" if len(node.key) > max_tokens else ""
            lines.append(
                f"{'  ' * depth}{head}{more} len={len(node.key)} lock={node.lock_ref} t={node.last_access_time}"
            )
            for child in node.children.values():
                visit(child, depth + 1)

        for extra_key, root in self._roots.items():
            lines.append(f"root[{extra_key!r}]")
            for child in root.children.values():
                visit(child, 1)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"RadixCache(page_size={self.page_size}, evictable={self._evictable}, protected={self._protected}, "
            f"namespaces={len(self._roots)})"
        )
