"""The hybrid KV memory of a model that mixes full-attention and sliding-window layers (Gemma 2/3, GPT-OSS).

Two slot spaces, each a :class:`PagedAllocator` with the same page size:

* the **full** pool: every token of a request has a slot there, read by the full-attention layers;
* the **SWA** pool (smaller): read by the windowed layers, which only need a request's last ``W - 1`` positions.

Every full page that holds live SWA KV maps to one SWA page (:class:`SWASlotMap`; token ``s`` of the full pool
lives at SWA slot ``map[s // P] * P + s % P``). The runner keeps the same map on the device, token by token, from
the writes the scheduler ships with each step: a step translates its new tokens' slots through it, and the
windowed layers' kernels read the request table through it (``ForwardBatch.translate_swa``, ``slot_map``).

:class:`HybridSWARadixCache` is the prefix cache over both pools. Its nodes always hold live full KV; a node whose
SWA KV was freed is an *SWA tombstone* (``swa_dead``). Rules:

* **Locks.** A running request full-locks its whole cached path (as :class:`RadixCache`) and SWA-locks only the
  nodes its window still reads: ``lock(node, start)`` SWA-locks the path from ``node`` up through the first node
  ending after ``start`` (cut there first) and returns the start of that topmost node; ``unlock_swa(..., below)``
  drops the nodes the window has left. SWA-locked nodes are full-locked too and never tombstones.
* **A match is usable** only where full KV is alive over the whole prefix (always, in the tree) and SWA KV over its
  last ``W - 1`` positions (all of them, when it is shorter): it ends at such a node.
* **Eviction.** ``evict`` (full pressure) takes least recently used unlocked leaves, freeing both pools' pages;
  ``evict_swa`` (SWA pressure) frees the SWA pages of unlocked nodes (by SWA lock) only, leaving tombstones. A
  tombstone leaf with no lock is removed at once (a match can never end there).
* **Insertion** (``insert_owned``) takes the request's full slots; which of them still hold SWA KV the map says.
  Duplicates of cached positions are freed, except that live SWA pages offered for a tombstone revive it (they are
  moved under the tree's full pages).
"""

from __future__ import annotations

import heapq

import numpy as np

from sgl_ray.mem_cache.allocator import PagedAllocator
from sgl_ray.mem_cache.base import CacheKey, MatchResult
from sgl_ray.mem_cache.radix_cache import RadixCache, TreeNode
from sgl_ray.mem_cache.swa_radix_cache import window_match

_EMPTY = np.empty(0, dtype=np.int64)


def _unique_pages(slots: np.ndarray, page_size: int) -> np.ndarray:
    pages = np.asarray(slots, dtype=np.int64) // page_size
    _, first = np.unique(pages, return_index=True)
    return pages[np.sort(first)]


class SWASlotMap:
    """The full pool's allocator, the SWA pool's, and the map from full pages to SWA pages (0: none).

    Every write to the map is also logged (:meth:`take_writes`) for the runner's device copy.
    """

    def __init__(self, full: PagedAllocator, swa: PagedAllocator) -> None:
        if full.page_size != swa.page_size:
            raise ValueError(f"page sizes differ: full {full.page_size}, SWA {swa.page_size}")
        self.full, self.swa = full, swa
        self.page_size = full.page_size
        self.pages = np.zeros(full.num_pages + 1, dtype=np.int64)
        self._writes: list[tuple[np.ndarray, np.ndarray]] = []

    def _set(self, pages: np.ndarray, values: np.ndarray | int) -> None:
        if len(pages):
            self.pages[pages] = values
            self._writes.append((pages.copy(), self.pages[pages].copy()))

    def map_new(self, slots: np.ndarray) -> bool:
        """Give each fresh full page among ``slots`` (those of its slots that start a page) an SWA page; False,
        mapping nothing, when the SWA pool is short."""
        slots = np.asarray(slots, dtype=np.int64)
        new = slots[slots % self.page_size == 0] // self.page_size
        swa = self.swa.alloc_pages(len(new))
        if swa is None:
            return False
        self._set(new, swa)
        return True

    def num_new_pages(self, slots: np.ndarray) -> int:
        return int(np.count_nonzero(np.asarray(slots) % self.page_size == 0))

    def swa_alive(self, slots: np.ndarray) -> np.ndarray:
        """Per slot: whether its page still has SWA KV."""
        return self.pages[np.asarray(slots, dtype=np.int64) // self.page_size] > 0

    def free_swa(self, slots: np.ndarray) -> None:
        """Free the SWA pages of the full pages covering ``slots`` (those that have one)."""
        if len(slots) == 0:
            return
        pages = _unique_pages(slots, self.page_size)
        swa = self.pages[pages]
        live = swa > 0
        if live.any():
            self.swa.free(swa[live] * self.page_size)
            self._set(pages[live], 0)

    def free(self, slots: np.ndarray) -> None:
        """Free the full pages covering ``slots`` and their SWA pages."""
        if len(slots) == 0:
            return
        self.free_swa(slots)
        self.full.free(slots)

    def move(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Hand the SWA pages of the full pages of ``src`` to those of ``dst`` (page by page, same order)."""
        src_pages, dst_pages = _unique_pages(src, self.page_size), _unique_pages(dst, self.page_size)
        assert len(src_pages) == len(dst_pages)
        values = self.pages[src_pages].copy()
        self._set(src_pages, 0)
        self._set(dst_pages, values)

    def take_writes(self) -> tuple[np.ndarray, np.ndarray]:
        """(full pages, SWA pages) written since the last call, the last write of each page only."""
        writes, self._writes = self._writes, []
        if not writes:
            return _EMPTY, _EMPTY
        pages = np.concatenate([p for p, _ in writes])
        values = np.concatenate([v for _, v in writes])
        _, last = np.unique(pages[::-1], return_index=True)
        keep = np.sort(len(pages) - 1 - last)
        return pages[keep], values[keep]

    @property
    def swa_held_pages(self) -> int:
        return int(np.count_nonzero(self.pages))


class HybridNode(TreeNode):
    """A tree node that knows its first position, its SWA lock count and whether its SWA KV is gone."""

    __slots__ = ("start", "swa_dead", "swa_ref")

    def __init__(self, key: np.ndarray, value: np.ndarray, parent: TreeNode | None, node_id: int) -> None:
        super().__init__(key, value, parent, node_id)
        self.start = 0 if parent is None else parent.start + len(parent.key)  # type: ignore[attr-defined]
        self.swa_dead = False
        self.swa_ref = 0

    @property
    def end(self) -> int:
        return self.start + len(self.key)


class HybridSWARadixCache(RadixCache):
    """See the module notes. ``evictable_size`` / ``protected_size`` count full slots (by full lock);
    ``swa_evictable_size`` / ``swa_protected_size`` count live SWA slots (by SWA lock).

    >>> full, swa = PagedAllocator(64, 4), PagedAllocator(32, 4)
    >>> smap = SWASlotMap(full, swa)
    >>> slots = full.alloc_pages(4) * 4 + np.arange(4)[:, None]
    >>> smap.map_new(slots.T.ravel())
    True
    >>> cache = HybridSWARadixCache(smap, window=8)
    >>> cache.insert_owned(CacheKey(list(range(16))), slots.T.ravel(), owned_from=0)
    >>> cache.match_prefix(CacheKey(list(range(16)))).length
    16
    """

    def __init__(self, slot_map: SWASlotMap, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.slot_map = slot_map
        super().__init__(slot_map.full)

    def _reset(self) -> None:
        super()._reset()
        self._swa_evictable = 0
        self._swa_protected = 0

    @property
    def swa_evictable_size(self) -> int:
        return self._swa_evictable

    @property
    def swa_protected_size(self) -> int:
        return self._swa_protected

    def _new_node(self, key: np.ndarray, value: np.ndarray, parent: TreeNode | None) -> HybridNode:
        return HybridNode(key, value, parent, next(self._ids))

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        assert isinstance(child, HybridNode)
        upper = super()._split(child, n)
        assert isinstance(upper, HybridNode)
        child.start = upper.end
        upper.swa_dead, upper.swa_ref = child.swa_dead, child.swa_ref
        return upper

    # ---- lookup ------------------------------------------------------------------------------------------------

    def match_prefix(self, key: CacheKey) -> MatchResult:
        """The longest usable cached prefix (see the module notes): full slots, one per token."""
        _, matched, _ = self._walk(key, np.asarray(key.token_ids, dtype=np.int64))
        return window_match(self.root(key.extra_key), matched, self.window, lambda n: n.swa_dead)

    # ---- locking -----------------------------------------------------------------------------------------------

    def lock(self, node: TreeNode, start: int) -> int:
        """Full-lock ``node``'s path and SWA-lock the nodes of it ending after ``start`` (they must hold SWA KV);
        returns the first SWA-locked position (``node``'s end when none is)."""
        assert isinstance(node, HybridNode)
        if node.parent is None:
            if len(node.key):
                raise RuntimeError(f"lock of a node no longer in the tree (evicted or flushed): {node!r}")
            return node.end
        self._cut_at(node, start)
        n: HybridNode = node
        while n.parent is not None and n.end > start:
            if n.swa_dead:
                raise RuntimeError(f"SWA lock of a tombstone: {n!r} (its SWA KV is gone)")
            n = n.parent  # type: ignore[assignment]
        self.inc_lock(node)
        top = node.end
        n = node
        while n.parent is not None and n.end > start:
            if n.swa_ref == 0:
                self._swa_evictable -= len(n.key)
                self._swa_protected += len(n.key)
            n.swa_ref += 1
            top = n.start
            n = n.parent  # type: ignore[assignment]
        return top

    def unlock_swa(self, node: TreeNode, start: int, below: int | None = None) -> int:
        """Undo the SWA part of ``lock(node, ...)`` that returned ``start`` — only for the nodes ending at or
        before ``below`` where that is given. Returns the new first SWA-locked position."""
        assert isinstance(node, HybridNode)
        if node.parent is None or start >= node.end:
            return node.end
        if below is not None:
            self._cut_at(node, below)
        path: list[HybridNode] = []
        n: HybridNode = node
        while n.parent is not None and n.end > start:
            path.append(n)
            n = n.parent  # type: ignore[assignment]
        top = path[0].end
        for p in path:
            if below is not None and p.end > below:
                top = p.start
                continue
            if p.swa_ref <= 0:
                raise RuntimeError(f"SWA unlock of an unlocked node: {p!r}")
            p.swa_ref -= 1
            if p.swa_ref == 0:
                self._swa_protected -= len(p.key)
                self._swa_evictable += len(p.key)
        return top

    def unlock(self, node: TreeNode, start: int) -> None:
        """Undo ``lock(node, ...)`` that returned ``start`` (both locks)."""
        assert isinstance(node, HybridNode)
        if node.parent is None:
            return
        self.unlock_swa(node, start)
        self.dec_lock(node)
        self._prune(node)  # a tombstone leaf nobody holds any more

    def _cut_at(self, node: HybridNode, position: int) -> None:
        """Split the node of ``node``'s path that holds ``position`` (cut down to a page) at it."""
        position -= position % self.page_size
        while node.parent is not None and node.start >= position:
            node = node.parent  # type: ignore[assignment]
        if node.parent is not None and node.start < position < node.end:
            self._split(node, position - node.start)

    # ---- insertion ---------------------------------------------------------------------------------------------

    def insert(self, key: CacheKey, slots: np.ndarray):  # noqa: ANN201 - see insert_owned
        raise NotImplementedError("HybridSWARadixCache takes insert_owned (owned ranges)")

    def insert_owned(self, key: CacheKey, slots: np.ndarray, owned_from: int) -> None:
        """Cache full ``slots`` as the KV of ``key`` (both cut to whole pages); positions before ``owned_from``
        are the cache's already (the caller holds the tree's slots there), the rest the caller's. Its slots become
        the cache's where the tree lacks them; its duplicates are freed, except live SWA pages offered for a
        tombstone, which revive it."""
        tokens = np.asarray(key.token_ids, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) != len(tokens):
            raise ValueError(f"insert: {len(tokens)} tokens but {len(slots)} slots")
        smap = self.slot_map
        node, matched, tokens = self._walk(key, tokens)
        pos = 0
        for m in list(matched):
            assert isinstance(m, HybridNode)
            n = len(m.key)
            offered = slots[pos : pos + n]
            dup = (np.arange(pos, pos + n) >= owned_from) & (offered != m.value)
            if dup.any() and m.swa_dead:
                alive = np.flatnonzero(dup & smap.swa_alive(offered))
                if len(alive):
                    first = int(alive[0]) - int(alive[0]) % self.page_size
                    if first > 0:  # only the tail has SWA KV: the head stays a tombstone
                        smap.free(offered[:first][dup[:first]])
                        self._split(m, first)
                        offered, dup, pos, n = offered[first:], dup[first:], pos + first, n - first
                    assert dup.all(), "a revived tombstone is offered whole"
                    smap.move(offered, m.value)
                    smap.full.free(offered)
                    m.swa_dead = False
                    self._swa_evictable += n
                    dup = np.zeros(n, dtype=bool)
            if dup.any():
                smap.free(offered[dup])
            pos += n
        alive_at = smap.swa_alive(slots[: len(tokens)])
        while pos < len(tokens):  # the rest: runs with and without SWA KV
            dead = not alive_at[pos]
            end = pos + 1
            while end < len(tokens) and (not alive_at[end]) == dead:
                end += 1
            end -= (end - pos) % self.page_size if end < len(tokens) else 0
            leaf = self._new_node(tokens[pos:end].copy(), slots[pos:end].copy(), node)
            leaf.last_access_time = next(self._clock)
            leaf.swa_dead = dead
            node.children[self._child_key(leaf.key)] = leaf
            self._leaves.discard(node)
            self._leaves.add(leaf)
            self._evictable += len(leaf.key)
            if not dead:
                self._swa_evictable += len(leaf.key)
            node, pos = leaf, end
        if isinstance(node, HybridNode):
            self._prune(node)

    # ---- eviction ----------------------------------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Full pressure: least recently used unlocked leaves leave the tree, freeing both pools' pages."""
        heap = [(n.last_access_time, n.id, n) for n in self._leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            if node.parent is None:  # removed meanwhile (a tombstone parent goes with its last child)
                continue
            n, parent = self._remove(node)
            freed += n
            if parent is not None:
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
        return freed

    def evict_swa(self, num_tokens: int) -> int:
        """SWA pressure: free the SWA pages of least recently used nodes without an SWA lock (they become
        tombstones; unlocked tombstone leaves leave the tree). Returns the SWA slots freed."""
        heap = [
            (n.last_access_time, n.id, n)
            for n in self._iter_nodes()
            if not n.swa_dead and n.swa_ref == 0  # type: ignore[attr-defined]
        ]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            if node.parent is None or node.swa_dead:  # removed meanwhile
                continue
            self.slot_map.free_swa(node.value)
            node.swa_dead = True
            self._swa_evictable -= len(node.key)
            freed += len(node.key)
            self._prune(node)
        return freed

    def _remove(self, node: HybridNode) -> tuple[int, HybridNode | None]:
        """Take the unlocked leaf ``node`` out of the tree, freeing its pages, and then each ancestor that is
        left an unlocked tombstone leaf. Returns (full slots freed, the last parent when it became an unlocked
        leaf holding SWA KV)."""
        freed = 0
        while True:
            assert not node.children and node.lock_ref == 0 and node.parent is not None
            self.slot_map.free(node.value)
            if not node.swa_dead:
                self._swa_evictable -= len(node.key)
            self._evictable -= len(node.key)
            freed += len(node.key)
            parent: HybridNode = node.parent  # type: ignore[assignment]
            del parent.children[self._child_key(node.key)]
            node.parent = None
            self._leaves.discard(node)
            if parent.parent is None or parent.children or parent.lock_ref:
                return freed, None
            if not parent.swa_dead:
                self._leaves.add(parent)
                return freed, parent
            node = parent

    def _prune(self, node: HybridNode) -> None:
        """Remove ``node`` if it is an unlocked tombstone leaf (and then its ancestors while they are)."""
        if node.parent is not None and node.swa_dead and not node.children and node.lock_ref == 0:
            self._remove(node)

    def flush(self) -> bool:
        if self._protected > 0:
            return False
        nodes = list(self._iter_nodes())
        values = [n.value for n in nodes]
        for node in nodes:
            node.parent = None
        if values:
            self.slot_map.free(np.concatenate(values))
        self._reset()
        return True

    def check(self) -> None:
        """Assert the invariants (tests): sizes, leaves, node starts, SWA liveness against the map, locks."""
        counts = [0, 0, 0, 0]  # full evictable, full protected, SWA evictable, SWA protected
        leaves = set()
        for node in self._iter_nodes():
            assert isinstance(node, HybridNode) and node.parent is not None
            assert node.start == node.parent.start + len(node.parent.key)  # type: ignore[attr-defined]
            alive = self.slot_map.swa_alive(node.value)
            assert (alive == (not node.swa_dead)).all(), f"SWA liveness of {node!r} disagrees with the map"
            assert node.swa_ref <= node.lock_ref, f"SWA lock without a full lock: {node!r}"
            assert not (node.swa_dead and node.swa_ref), node
            assert node.children or not node.swa_dead or node.lock_ref, f"a tombstone leaf stayed: {node!r}"
            counts[0 if node.lock_ref == 0 else 1] += len(node.key)
            if not node.swa_dead:
                counts[2 if node.swa_ref == 0 else 3] += len(node.key)
            if not node.children and node.lock_ref == 0:
                leaves.add(node)
        assert counts == [self._evictable, self._protected, self._swa_evictable, self._swa_protected], counts
        assert leaves == self._leaves
