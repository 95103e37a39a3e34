"""Hybrid full/SWA KV pools (models mixing full-attention and windowed layers): every token keeps its full slot,
the windowed layers' SWA slots past a request's window are freed, the radix cache keeps SWA tombstones, and a
prefix match is usable only where the SWA KV covers its last W - 1 tokens. Checked against a brute-force model of
both slot spaces — page ownership, and what each slot holds — over random interleavings."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sgl_ray.mem_cache.allocator import PagedAllocator
from sgl_ray.mem_cache.base import CacheKey
from sgl_ray.mem_cache.hybrid_swa import HybridSWARadixCache, SWASlotMap
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.kv_manager import KVCacheManager
from sgl_ray.scheduler.request import Req

W = 16
P = 4


def new_req(rid: str, prompt: list[int]) -> Req:
    return Req(rid=rid, prompt_ids=list(prompt), sampling=SamplingParams(max_new_tokens=1000), seed=0)


class Store:
    """What each slot of the two pools holds: a token's identity (its whole prefix), written where a model
    would write its K/V — the full slot, and the SWA slot its page maps to."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.full: dict[int, tuple[int, ...]] = {}
        self.swa: dict[int, tuple[int, ...]] = {}

    def swa_slot(self, full_slot: int) -> int:
        smap = self.kv.slot_map
        assert smap is not None
        return int(smap.pages[full_slot // P]) * P + full_slot % P

    def compute(self, r: Req, lo: int, hi: int) -> None:
        ids = r.fill_ids
        for pos in range(lo, hi):
            slot = int(r.kv_slots.view()[pos])
            self.full[slot] = tuple(ids[: pos + 1])
            swa = self.swa_slot(slot)
            assert swa >= P, "a computed token has an SWA slot"
            self.swa[swa] = tuple(ids[: pos + 1])

    def check_reads(self, r: Req) -> None:
        """What the next token's layers read is the request's own KV: every position's full slot, and the SWA
        slots of the positions its window reaches."""
        ids, slots, n = r.fill_ids, r.kv_slots.view(), r.num_computed
        for pos in range(n):
            assert self.full.get(int(slots[pos])) == tuple(ids[: pos + 1]), f"full KV of {r.rid}@{pos}"
        for pos in range(max(0, n - W + 1), n):
            assert self.swa.get(self.swa_slot(int(slots[pos]))) == tuple(ids[: pos + 1]), (
                f"SWA of {r.rid}@{pos}"
            )


def step(kv: KVCacheManager, store: Store, r: Req, n: int) -> bool:
    """Compute ``n`` more tokens of ``r`` as the scheduler does: allocate, compute, cache prompt chunks, slide."""
    while r.num_tokens < r.num_computed + n:
        r.output_ids.append(5000 + len(r.output_ids))
    if kv.alloc([r], [n]) is None:
        return False
    store.compute(r, r.num_computed, r.num_computed + n)
    r.num_computed += n
    if r.num_computed <= len(r.prompt_ids):
        kv.cache_unfinished(r)
    kv.slide(r)
    return True


def check_ownership(kv: KVCacheManager, running: list[Req]) -> None:
    """Full pages: each exactly one of free, a cache node's, a running request's own. SWA pages: each free or
    mapped from exactly one full page, and only from a live cache node's or a request's own page at or past its
    ``window_done``. A request keeps every full slot; its window's SWA KV is live (locked where the cache's)."""
    smap = kv.slot_map
    assert smap is not None
    full_owner = np.zeros(kv.allocator.num_pages + 1, dtype=np.int64)
    full_owner[np.flatnonzero(kv.allocator._is_free)] += 1
    may_map = np.zeros_like(full_owner, dtype=bool)
    cache = kv.cache
    if cache is not None:
        assert isinstance(cache, HybridSWARadixCache)
        cache.check()
        for node in cache._iter_nodes():
            np.add.at(full_owner, np.unique(node.value // P), 1)
            if not node.swa_dead:  # type: ignore[attr-defined]
                may_map[node.value // P] = True
    for r in running:
        slots = r.kv_slots.view()
        assert (slots >= 0).all(), "hybrid pools keep every full slot"
        own = slots[r.tree_len :]
        np.add.at(full_owner, np.unique(own // P), 1)
        may_map[slots[max(r.tree_len, r.window_done) :] // P] = True
        window = slots[max(0, r.num_computed - W + 1) : r.num_computed]
        assert smap.swa_alive(window).all(), f"{r.rid}: its window lost SWA KV"
    assert (full_owner[1:] == 1).all(), f"full pages owned {full_owner[1:].tolist()}"
    mapped = smap.pages[1:]
    assert not (mapped[~may_map[1:]] > 0).any(), "an SWA page mapped from a page that may not hold one"
    swa_owner = np.zeros(smap.swa.num_pages + 1, dtype=np.int64)
    swa_owner[np.flatnonzero(smap.swa._is_free)] += 1
    np.add.at(swa_owner, mapped[mapped > 0], 1)
    assert (swa_owner[1:] == 1).all(), f"SWA pages owned {swa_owner[1:].tolist()}"


def test_a_running_request_frees_its_swa_past_the_window_and_keeps_full_kv():
    kv = KVCacheManager((64 + 1) * P, P, 4, enable_prefix_cache=False, window=W, swa_slots=(12 + 1) * P)
    store = Store(kv)
    r = new_req("a", list(range(100)))
    assert kv.admit(r, None, 0)
    while r.num_computed < 100:
        assert step(kv, store, r, min(7, 100 - r.num_computed))
    for _ in range(40):
        assert step(kv, store, r, 1)
        check_ownership(kv, [r])
        store.check_reads(r)
        assert kv.swa_held() <= W + 2 * P
    assert kv.held() == 140 + (-140) % P  # every full slot (pages)
    assert kv.peak_swa_held <= W + 2 * P + 8
    kv.release(r)
    assert kv.allocator.num_free_slots == kv.capacity
    assert kv.slot_map is not None and kv.slot_map.swa.num_free_slots == kv.swa_capacity


def test_swa_pressure_evicts_swa_only_and_a_match_needs_a_live_window():
    kv = KVCacheManager((96 + 1) * P, P, 4, window=W, swa_slots=(24 + 1) * P)
    store = Store(kv)
    cache = kv.cache
    assert isinstance(cache, HybridSWARadixCache)
    prompt = list(range(200))
    a = new_req("a", prompt)
    assert kv.admit(a, kv.match(a), 0)
    while a.num_computed < 200:
        assert step(kv, store, a, min(24, 200 - a.num_computed))
    # the full KV of the whole prompt stays locked; only its window's SWA KV is locked
    assert cache.protected_size == 200 and cache.swa_protected_size <= W + P
    kv.release(a)
    check_ownership(kv, [])
    b = new_req("b", prompt + [7])
    m = kv.match(b)
    assert m is not None and m.length == 200
    # SWA pressure: a new request on another prefix needs most of the SWA pool
    c = new_req("c", [10_000 + i for i in range(80)])
    assert kv.admit(c, kv.match(c), 0)
    assert step(kv, store, c, 80)
    check_ownership(kv, [c])
    assert cache.total_size >= 160, "SWA eviction leaves the full KV cached"
    m = kv.match(b)
    assert m is not None
    alive = kv.slot_map.swa_alive(m.slots)  # type: ignore[union-attr]
    assert alive[max(0, m.length - W + 1) :].all(), "the match's window has SWA KV"
    assert kv.admit(b, m, 0)
    store.check_reads(b)
    while b.num_computed < len(b.prompt_ids):
        assert step(kv, store, b, min(30, len(b.prompt_ids) - b.num_computed))
    check_ownership(kv, [b, c])
    store.check_reads(b)
    kv.release(b)
    kv.release(c)
    check_ownership(kv, [])
    assert cache.flush()
    assert kv.allocator.num_free_slots == kv.capacity
    assert kv.slot_map.swa.num_free_slots == kv.swa_capacity  # type: ignore[union-attr]


def test_a_tombstone_is_revived_by_a_request_that_recomputed_it():
    full, swa = PagedAllocator((32 + 1) * P, P), PagedAllocator((32 + 1) * P, P)
    smap = SWASlotMap(full, swa)
    cache = HybridSWARadixCache(smap, window=W)
    tokens = list(range(32))
    slots = (full.alloc_pages(8)[:, None] * P + np.arange(P)).reshape(-1)
    assert smap.map_new(slots)
    cache.insert_owned(CacheKey(tokens), slots, owned_from=0)
    assert cache.evict_swa(1) == 32 and cache.total_size == 0  # an unlocked tombstone leaf goes whole
    cache.insert_owned(
        CacheKey(tokens), slots := (full.alloc_pages(8)[:, None] * P + np.arange(P)).reshape(-1), 0
    )
    cache.check()  # no SWA pages mapped: inserted as a tombstone, pruned
    assert cache.total_size == 0 and full.num_free_slots == full.capacity
    # a live tail under a tombstone: match ends at the live node only when it covers W - 1 positions
    slots = (full.alloc_pages(8)[:, None] * P + np.arange(P)).reshape(-1)
    assert smap.map_new(slots)
    cache.insert_owned(CacheKey(tokens), slots, owned_from=0)
    head = cache.match_prefix(CacheKey(tokens[:8])).node
    cache.lock(cache.match_prefix(CacheKey(tokens)).node, 32)  # pin the tail's full KV (nothing SWA-locked)
    smap.free_swa(head.value)
    head.swa_dead = True
    cache._swa_evictable -= 8
    cache.check()
    assert cache.match_prefix(CacheKey(tokens)).length == 32  # 24 live positions after the tombstone >= W - 1
    redo = (full.alloc_pages(2)[:, None] * P + np.arange(P)).reshape(-1)
    assert smap.map_new(redo)
    cache.insert_owned(CacheKey(tokens[:8]), redo, owned_from=0)  # a request that computed the head again
    cache.check()
    assert not head.swa_dead and (smap.swa_alive(head.value)).all()
    assert full.num_free_slots == full.capacity - 32


@pytest.mark.parametrize("seed", range(6))
def test_random_interleavings_keep_both_pools_exact(seed):
    """Requests on shared prefixes, admitted, computed in chunks, decoded, preempted and finished in a random
    order under small pools (full and SWA evictions, tombstones, revivals happen): ownership of both slot spaces
    stays exact and every running request reads its own tokens' KV after every operation; releasing everything
    gives every page of both pools back."""
    rng = random.Random(seed)
    kv = KVCacheManager((90 + 1) * P, P, 6, window=W, swa_slots=(30 + 1) * P)
    store = Store(kv)
    stems = [[s * 1000 + i for i in range(rng.randrange(20, 90))] for s in range(3)]
    running: list[Req] = []
    for i in range(300):
        op = rng.random()
        if op < 0.25 and len(running) < 5:
            stem = rng.choice(stems)
            r = new_req(f"r{i}", stem[: rng.randrange(P, len(stem) + 1)] + [9] * rng.randrange(0, 12))
            if kv.admit(r, kv.match(r), 0):
                running.append(r)
        elif op < 0.85 and running:
            r = rng.choice(running)
            step(kv, store, r, rng.choice([1, 3, 8, 17]))
        elif running:
            kv.release(running.pop(rng.randrange(len(running))))
        check_ownership(kv, running)
        for r in running:
            store.check_reads(r)
    for r in running:
        kv.release(r)
    check_ownership(kv, [])
    cache = kv.cache
    assert cache is not None and cache.protected_size == 0
    assert kv.allocator.num_free_slots + cache.evictable_size == kv.capacity
    assert cache.flush()
    assert kv.allocator.num_free_slots == kv.capacity
    assert kv.slot_map is not None and kv.slot_map.swa.num_free_slots == kv.swa_capacity
