"""RadixCache over a real PagedAllocator: exact slots, tree shape, lock accounting, LRU order, and a randomized
check of slot ownership against a brute-force model."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sgl_ray.mem_cache.allocator import PagedAllocator
from sgl_ray.mem_cache.base import CacheKey
from sgl_ray.mem_cache.prefix_hash import block_hashes, longest_shared_prefix
from sgl_ray.mem_cache.radix_cache import RadixCache, TreeNode


def K(*tokens: int, extra: str | None = None) -> CacheKey:
    return CacheKey(tuple(tokens), extra)


def _arr(xs) -> np.ndarray:
    return np.asarray(list(xs), dtype=np.int64)


def make(num_pages: int = 32, page_size: int = 1) -> tuple[PagedAllocator, RadixCache]:
    a = PagedAllocator((num_pages + 1) * page_size, page_size)
    return a, RadixCache(a)


def alloc(a: PagedAllocator, n: int) -> np.ndarray:
    out = a.alloc_extend(_arr([0]), _arr([-1]), _arr([n]))
    assert out is not None
    return out


def keys(node: TreeNode) -> list[list[int]]:
    return sorted(c.key.tolist() for c in node.children.values())


def sizes(c: RadixCache) -> tuple[int, int]:
    return c.evictable_size, c.protected_size


# ---- page_size 1 ------------------------------------------------------------------------------------------------


def test_insert_then_match_exact_slots() -> None:
    a, c = make()
    slots = alloc(a, 4)  # 1..4
    res = c.insert(K(10, 11, 12, 13), slots)
    assert res.num_cached == 0 and res.node.key.tolist() == [10, 11, 12, 13]
    assert sizes(c) == (4, 0) and c.total_size == 4
    m = c.match_prefix(K(10, 11, 12, 13, 14))
    assert m.slots.tolist() == [1, 2, 3, 4] and m.length == 4 and m.node is res.node
    assert m.slots.dtype == np.int64
    miss = c.match_prefix(K(99, 10))
    assert miss.length == 0 and miss.node is c.root(None)
    slots[0] = 77  # the cache copied the caller's array
    assert c.match_prefix(K(10)).slots.tolist() == [1]


def test_partial_match_splits_node() -> None:
    a, c = make()
    leaf = c.insert(K(1, 2, 3, 4, 5), alloc(a, 5)).node
    m = c.match_prefix(K(1, 2, 3, 9))
    assert m.slots.tolist() == [1, 2, 3]
    assert m.node.key.tolist() == [1, 2, 3] and m.node.value.tolist() == [1, 2, 3]
    assert keys(c.root()) == [[1, 2, 3]]
    assert keys(m.node) == [[4, 5]]
    # The original leaf keeps its identity and now holds only the tail.
    assert leaf.parent is m.node and leaf.value.tolist() == [4, 5]
    assert sizes(c) == (5, 0)
    assert c.match_prefix(K(1, 2, 3, 4, 5)).slots.tolist() == [1, 2, 3, 4, 5]


def test_insert_reports_cached_prefix() -> None:
    a, c = make()
    c.insert(K(1, 2, 3, 4), alloc(a, 4))  # slots 1..4
    new = alloc(a, 4)  # 5..8, the request's own copy of [1, 2] plus [5, 6]
    res = c.insert(K(1, 2, 5, 6), new)
    assert res.num_cached == 2 and res.node.key.tolist() == [5, 6]
    a.free(new[:2])  # the caller frees its duplicates
    assert keys(c.root()) == [[1, 2]]
    assert keys(res.node.parent) == [[3, 4], [5, 6]]
    assert c.match_prefix(K(1, 2, 5, 6)).slots.tolist() == [1, 2, 7, 8]
    assert sizes(c) == (6, 0)
    # Inserting something fully cached adds nothing and ends at the right node.
    again = c.insert(K(1, 2), _arr([9, 9]))
    assert again.num_cached == 2 and again.node is res.node.parent
    assert sizes(c) == (6, 0)
    assert a.num_free_slots == 32 - 6


def test_extra_key_isolation() -> None:
    a, c = make()
    c.insert(K(1, 2, 3), alloc(a, 3))
    c.insert(K(1, 2, 3, extra="lora-a"), alloc(a, 3))
    assert c.match_prefix(K(1, 2, 3)).slots.tolist() == [1, 2, 3]
    assert c.match_prefix(K(1, 2, 3, extra="lora-a")).slots.tolist() == [4, 5, 6]
    miss = c.match_prefix(K(1, 2, 3, extra="lora-b"))
    assert miss.length == 0 and miss.node is c.root("lora-b")
    res = c.insert(K(1, 2, 3, extra="lora-a"), alloc(a, 3))
    assert res.num_cached == 3
    assert sizes(c) == (6, 0)


def test_lock_protects_node_and_ancestors() -> None:
    a, c = make()
    c.insert(K(1, 2, 3, 4), alloc(a, 4))
    b = c.insert(K(1, 2, 5, 6), _arr([1, 2, *alloc(a, 2)])).node  # tree: [1 2] -> {[3 4], [5 6]}
    c.inc_lock(b)
    assert sizes(c) == (2, 4)
    c.inc_lock(b)  # a second request on the same path changes nothing
    assert sizes(c) == (2, 4)
    assert c.evict(100) == 2  # only [3 4] may go
    assert c.match_prefix(K(1, 2, 5, 6)).length == 4
    assert c.match_prefix(K(1, 2, 3, 4)).length == 2
    c.dec_lock(b)
    assert sizes(c) == (0, 4)
    c.dec_lock(b)
    assert sizes(c) == (4, 0)
    with pytest.raises(RuntimeError):
        c.dec_lock(b)
    c.inc_lock(c.root())  # roots are never counted
    c.dec_lock(c.root())
    assert sizes(c) == (4, 0)


def test_split_under_a_lock_keeps_accounting() -> None:
    a, c = make()
    node = c.insert(K(1, 2, 3, 4), alloc(a, 4)).node
    c.inc_lock(node)
    res = c.insert(K(1, 2, 9), _arr([1, 2, *alloc(a, 1)]))  # splits the locked node at 2
    assert res.num_cached == 2
    assert sizes(c) == (1, 4)
    assert node.parent.lock_ref == 1 and node.parent.key.tolist() == [1, 2]
    c.dec_lock(node)
    assert sizes(c) == (5, 0)
    assert c.evict(5) == 5 and sizes(c) == (0, 0)


def test_lru_eviction_order_through_free_list() -> None:
    a, c = make(num_pages=6)
    c.insert(K(1, 1), alloc(a, 2))  # slots 1, 2
    c.insert(K(2, 2), alloc(a, 2))  # slots 3, 4
    c.insert(K(3, 3), alloc(a, 2))  # slots 5, 6
    assert a.num_free_slots == 0
    c.match_prefix(K(1, 1))  # now [2 2] is the oldest, then [3 3], then [1 1]
    assert c.evict(1) == 2
    assert c.evict(2) == 2
    assert sizes(c) == (2, 0)
    np.testing.assert_array_equal(a.alloc_pages(4), [3, 4, 5, 6])
    assert c.match_prefix(K(1, 1)).slots.tolist() == [1, 2]
    assert c.evict(3) == 2  # fewer than asked: nothing else is cached
    np.testing.assert_array_equal(a.alloc_pages(2), [1, 2])


def test_eviction_cascades_to_parent_before_newer_leaf() -> None:
    a, c = make(num_pages=6)
    c.insert(K(1, 2), alloc(a, 2))  # slots 1, 2
    c.insert(K(1, 2, 3, 4), _arr([1, 2, *alloc(a, 2)]))  # [1 2] -> [3 4] (slots 3, 4)
    c.insert(K(7, 8), alloc(a, 2))  # slots 5, 6, newest
    assert c.evict(3) == 4  # [3 4], then its parent [1 2] which just became an older leaf
    assert keys(c.root()) == [[7, 8]]
    np.testing.assert_array_equal(a.alloc_pages(4), [3, 4, 1, 2])


def test_evict_returns_less_when_locked_and_stale_handles_raise() -> None:
    a, c = make()
    keep = c.insert(K(1, 2, 3), alloc(a, 3)).node
    gone = c.insert(K(5, 6), alloc(a, 2)).node
    c.inc_lock(keep)
    assert c.evict(10) == 2
    assert c.evict(10) == 0
    assert sizes(c) == (0, 3)
    with pytest.raises(RuntimeError):
        c.inc_lock(gone)


def test_flush() -> None:
    a, c = make()
    node = c.insert(K(1, 2, 3), alloc(a, 3)).node
    c.insert(K(4, 5), alloc(a, 2))
    c.inc_lock(node)
    assert c.flush() is False
    assert sizes(c) == (2, 3)
    c.dec_lock(node)
    assert c.flush() is True
    assert sizes(c) == (0, 0) and a.num_free_slots == a.capacity
    assert c.match_prefix(K(1, 2, 3)).length == 0
    with pytest.raises(RuntimeError):
        c.inc_lock(node)


def test_summary_and_pretty() -> None:
    a, c = make(page_size=2)
    c.insert(K(1, 2, 3, 4), alloc(a, 4))
    c.insert(K(1, 2, 5, 6, extra="x"), alloc(a, 4))
    assert "root['x']" in c.pretty() and "len=4" in c.pretty()
    # The summary names exactly the block-aligned prefixes held, per namespace, across node boundaries.
    c.insert(K(1, 2, 3, 4, 7, 8), alloc(a, 6))  # splits nothing, adds a child [7, 8]
    s = c.summary(block=2)
    assert s == set(block_hashes([1, 2, 3, 4, 7, 8], 2)) | set(block_hashes([1, 2, 5, 6], 2, extra_key="x"))
    assert block_hashes([1, 2, 5, 6], 2)[1] not in s  # same tokens, other namespace
    assert set(block_hashes([1, 2, 3, 4, 7, 8], 4)) == {block_hashes([1, 2, 3, 4], 4)[0]} and (
        c.summary(block=4) >= {block_hashes([1, 2, 3, 4], 4)[0]}
    )
    assert longest_shared_prefix(block_hashes([1, 2, 3, 4, 9, 9], 2), s, 2) == 4


# ---- page_size 4 ------------------------------------------------------------------------------------------------


def test_paged_insert_truncates_and_matches_whole_pages() -> None:
    a, c = make(num_pages=8, page_size=4)
    slots = alloc(a, 10)  # pages 1, 2, 3 -> slots 4..13
    res = c.insert(K(*range(100, 110)), slots)
    assert res.num_cached == 0 and len(res.node.key) == 8
    a.free(slots[8:])  # the partial page stays with the request
    assert sizes(c) == (8, 0)
    assert c.match_prefix(K(*range(100, 110))).slots.tolist() == list(range(4, 12))
    # A mismatch inside the second page matches only the first page, and splits there.
    m = c.match_prefix(K(100, 101, 102, 103, 104, 105, 0, 0))
    assert m.slots.tolist() == [4, 5, 6, 7] and m.node.key.tolist() == [100, 101, 102, 103]
    assert keys(m.node) == [[104, 105, 106, 107]]
    # A mismatch inside the first page matches nothing and splits nothing.
    miss = c.match_prefix(K(100, 101, 0, 0))
    assert miss.length == 0 and miss.node is c.root()
    assert c.match_prefix(K(100, 101, 102)).length == 0  # shorter than a page
    assert len(c.root().children) == 1
    assert list(c.root().children) == [(100, 101, 102, 103)]


def test_paged_insert_num_cached_and_lru() -> None:
    a, c = make(num_pages=4, page_size=4)
    first = alloc(a, 8)  # slots 4..11
    c.insert(K(*range(8)), first)
    assert a.alloc_extend(_arr([0]), _arr([-1]), _arr([9])) is None  # 3 pages needed, 2 free
    second = alloc(a, 8)  # slots 12..19: the request's own copy of page 0, then a new page
    res = c.insert(K(0, 1, 2, 3, 9, 9, 9, 9, 5), _arr([*second, 99]))
    assert res.num_cached == 4 and res.node.key.tolist() == [9, 9, 9, 9]
    a.free(second[:4])
    assert sizes(c) == (12, 0)
    c.match_prefix(K(*range(8)))  # touch the first branch
    assert c.evict(1) == 4  # [9 9 9 9] is the least recently used leaf
    np.testing.assert_array_equal(a.alloc_pages(2), [3, 4])
    assert sizes(c) == (8, 0)


# ---- randomized model check -------------------------------------------------------------------------------------


def _walk(c: RadixCache) -> tuple[dict[tuple, np.ndarray], list[TreeNode]]:
    """Every cached whole-page prefix ``(extra_key, tokens)`` -> its slots, and every non-root node."""
    prefixes: dict[tuple, np.ndarray] = {}
    nodes: list[TreeNode] = []
    for extra, root in c._roots.items():
        stack = [(root, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))]
        while stack:
            node, toks, vals = stack.pop()
            for child in node.children.values():
                t, v = np.concatenate([toks, child.key]), np.concatenate([vals, child.value])
                for end in range(len(toks) + c.page_size, len(t) + 1, c.page_size):
                    prefixes[(extra, tuple(t[:end].tolist()))] = v[:end]
                nodes.append(child)
                stack.append((child, t, v))
    return prefixes, nodes


def _check_invariants(a: PagedAllocator, c: RadixCache, held: list[np.ndarray]) -> dict[tuple, np.ndarray]:
    prefixes, nodes = _walk(c)
    ps = c.page_size
    evictable = protected = 0
    for n in nodes:
        assert len(n.key) == len(n.value) > 0 and len(n.key) % ps == 0
        assert n.parent.parent is None or n.parent.lock_ref >= n.lock_ref >= 0
        if n.lock_ref:
            protected += len(n.key)
        else:
            evictable += len(n.key)
        assert (n in c._leaves) == (not n.children and n.lock_ref == 0)
    assert sizes(c) == (evictable, protected)
    assert len(c._leaves) == sum(1 for n in nodes if not n.children and n.lock_ref == 0)
    # Ownership: tree pages and request-held pages are distinct, and with the free list they are every page.
    pages = [n.value[::ps] // ps for n in nodes] + [np.unique(h // ps) for h in held]
    all_pages = np.concatenate(pages) if pages else np.empty(0, dtype=np.int64)
    assert len(np.unique(all_pages)) == len(all_pages)
    assert a.num_free_pages + len(all_pages) == a.num_pages
    return prefixes


@pytest.mark.parametrize("page_size", [1, 4])
def test_random_ops_against_model(page_size: int) -> None:
    rng = random.Random(1234 + page_size)
    a, c = make(num_pages=48 if page_size == 1 else 24, page_size=page_size)
    ps = page_size
    # (extra, whole-page prefix, i) -> slot of token i (in the prefix's last page), set when that page gets cached
    first_slots: dict[tuple, int] = {}
    running: list[tuple[CacheKey, np.ndarray, int, TreeNode]] = []  # key, slots, matched, locked node

    def random_key() -> CacheKey:
        n = rng.randint(0, 14)
        toks = [rng.choice((1, 1, 1, 2)) if i < 8 else rng.randint(1, 4) for i in range(n)]
        return CacheKey(tuple(toks), rng.choice((None, None, "x")))

    def held() -> list[np.ndarray]:
        return [s[m:] for _, s, m, _ in running]

    def check_match(key: CacheKey, prefixes: dict[tuple, np.ndarray]) -> None:
        m = c.match_prefix(key)
        toks = tuple(key.token_ids)
        best = max(
            (e for e in range(ps, len(toks) + 1, ps) if (key.extra_key, toks[:e]) in prefixes), default=0
        )
        assert m.length == best
        for i in range(m.length):
            assert m.slots[i] == first_slots[(key.extra_key, toks[: i // ps * ps + ps], i)]

    for _ in range(400):
        op = rng.random()
        prefixes = _check_invariants(a, c, held())
        if op < 0.35:  # a request arrives: match, lock, allocate the rest
            key = random_key()
            m = c.match_prefix(key)
            check_match(key, prefixes)
            c.inc_lock(m.node)
            n_new = len(key.token_ids) - m.length
            new = a.alloc_extend(_arr([m.length]), _arr([-1]), _arr([n_new]))
            if new is None:
                c.evict(n_new)
                new = a.alloc_extend(_arr([m.length]), _arr([-1]), _arr([n_new]))
            if new is None:
                c.dec_lock(m.node)
                continue
            running.append((key, np.concatenate([m.slots, new]), m.length, m.node))
        elif op < 0.65 and running:  # a request finishes: insert, free duplicates and the partial page
            key, slots, matched, node = running.pop(rng.randrange(len(running)))
            res = c.insert(key, slots)
            end = len(slots) - len(slots) % ps
            assert matched <= res.num_cached <= end
            for i in range(res.num_cached, end):
                first_slots[(key.extra_key, tuple(key.token_ids[: i // ps * ps + ps]), i)] = int(slots[i])
            if res.num_cached > matched or end < len(slots):
                a.free(np.concatenate([slots[matched : res.num_cached], slots[end:]]))
            assert len(res.node.key) == 0 or res.node.parent is not None
            c.dec_lock(node)
            assert c.match_prefix(key).length == end
        elif op < 0.85:
            key = random_key()
            check_match(key, prefixes)
        elif op < 0.97:
            before = c.evictable_size
            want = rng.randint(1, 12)
            freed = c.evict(want)
            assert freed >= min(want, before) and freed <= before
            assert freed >= want or c.evictable_size == 0
        else:  # allowed exactly when no running request holds a cached prefix
            assert c.flush() == all(matched == 0 for _, _, matched, _ in running)
    _check_invariants(a, c, held())
    for _, _, _, node in running:
        c.dec_lock(node)
    assert c.protected_size == 0 and c.flush()
    a.free(np.concatenate(held()) if running else np.empty(0, dtype=np.int64))
    assert a.num_free_slots == a.capacity
