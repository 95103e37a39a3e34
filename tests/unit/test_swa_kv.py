"""Sliding-window KV (every layer attends within W positions): the KV manager lets go of what a request's window
has left, the SWA radix cache keeps keys with tombstoned KV, and a prefix match is usable only where the new
tokens' windows find live KV. Checked against a brute-force model of page ownership, with random interleavings."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sgl_ray.mem_cache.allocator import PagedAllocator
from sgl_ray.mem_cache.base import CacheKey
from sgl_ray.mem_cache.swa_radix_cache import SWARadixCache, WindowNode
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.kv_manager import KVCacheManager
from sgl_ray.scheduler.request import Req

W = 16
P = 4


def new_req(rid: str, prompt: list[int]) -> Req:
    return Req(rid=rid, prompt_ids=list(prompt), sampling=SamplingParams(max_new_tokens=1000), seed=0)


def run_to(kv: KVCacheManager, r: Req, total: int, chunk: int) -> None:
    """Compute ``r`` up to ``total`` tokens (prompt, then outputs) in steps of at most ``chunk``, as the
    scheduler does: allocate, compute, cache prompt chunks, slide."""
    while r.num_computed < total:
        n = min(chunk, total - r.num_computed)
        while r.num_tokens < r.num_computed + n:
            r.output_ids.append(1000 + len(r.output_ids))
        assert kv.alloc([r], [n]) is not None
        r.num_computed += n
        if r.num_computed <= len(r.prompt_ids):
            kv.cache_unfinished(r)
        kv.slide(r)


def held_by(r: Req) -> int:
    """Slots the request reads from (its own, and the cache's it keeps locked)."""
    return int((r.kv_slots.view() >= 0).sum())


def check_ownership(kv: KVCacheManager, running: list[Req]) -> None:
    """Every allocatable page is exactly one of: free, a live cache node's, a running request's own; a request's
    locked range holds the tree's live slots; positions before ``window_done`` are -1."""
    a = kv.allocator
    owner = np.zeros(a.num_pages + 1, dtype=np.int64)
    owner[np.flatnonzero(a._is_free)] += 1
    if kv.cache is not None:
        cache = kv.cache
        assert isinstance(cache, SWARadixCache)
        cache.check()
        for node in cache._iter_nodes():
            if not node.dead:  # type: ignore[attr-defined]
                np.add.at(owner, np.unique(node.value // P), 1)
    for r in running:
        slots = r.kv_slots.view()
        assert (slots[: r.window_done] == -1).all()
        own = slots[r.tree_len :]
        np.add.at(owner, np.unique(own[own >= 0] // P), 1)
        assert (slots[r.window_done : r.tree_len] >= 0).all() or r.tree_len <= r.window_done
    assert (owner[1:] == 1).all(), f"pages owned {owner[1:].tolist()}"


def test_a_request_holds_only_its_window():
    kv = KVCacheManager(num_slots=(64 + 1) * P, page_size=P, max_reqs=4, enable_prefix_cache=False, window=W)
    r = new_req("a", list(range(100)))
    assert kv.admit(r, None, 0)
    peak = 0
    run_to(kv, r, 100, 7)  # prefill chunks of 7
    for _ in range(60):  # decode
        run_to(kv, r, r.num_computed + 1, 1)
        peak = max(peak, kv.capacity - kv.allocator.num_free_slots)
        check_ownership(kv, [r])
    # positions from (computed, cut to pages) - W + 1 on, plus the partial last page: at most W + 2P slots
    assert peak <= W + 2 * P
    kv.release(r)
    assert kv.allocator.num_free_slots == kv.capacity


def test_a_prompt_cached_as_one_node_is_let_go_of_behind_the_window():
    """The whole prompt in one prefill chunk is one tree node: the lock is cut at the window's start."""
    kv = KVCacheManager(num_slots=(96 + 1) * P, page_size=P, max_reqs=4, window=W)
    r = new_req("a", list(range(200)))
    assert kv.admit(r, kv.match(r), 0)
    run_to(kv, r, 200, 200)
    assert kv.held() <= W + P
    for _ in range(30):
        run_to(kv, r, r.num_computed + 1, 1)
        assert kv.held() <= W + 2 * P
        check_ownership(kv, [r])
    kv.release(r)
    check_ownership(kv, [])


def test_without_a_window_nothing_is_let_go():
    kv = KVCacheManager(num_slots=(64 + 1) * P, page_size=P, max_reqs=4, enable_prefix_cache=False)
    r = new_req("a", list(range(100)))
    assert kv.admit(r, None, 0)
    run_to(kv, r, 160, 8)
    assert kv.capacity - kv.allocator.num_free_slots == 160


def test_prefix_cache_keeps_keys_and_matches_only_a_live_window():
    kv = KVCacheManager(num_slots=(96 + 1) * P, page_size=P, max_reqs=4, window=W)
    cache = kv.cache
    assert isinstance(cache, SWARadixCache)
    prompt = list(range(200))
    a = new_req("a", prompt)
    assert kv.admit(a, kv.match(a), 0)
    run_to(kv, a, 200, 24)
    # while it runs, only the pages its window reads stay locked (nodes are cut at the window's start); the rest
    # of the prompt is evictable, not freed
    assert cache.protected_size <= W + P and cache.evictable_size >= 200 - W - P
    check_ownership(kv, [a])
    kv.release(a)
    check_ownership(kv, [])

    b = new_req("b", prompt + [7])  # the whole prompt is cached and live: the match reaches it all
    m = kv.match(b)
    assert m is not None and m.length == 200
    # evict most of it: the oldest nodes first, so a tombstoned head and a live tail
    cache.evict(150)
    check_ownership(kv, [])
    m = kv.match(b)
    assert m is not None and m.length > 0
    assert (m.slots[m.length - W + 1 :] >= 0).all(), "the new tokens' window must find live KV"
    dead = int((m.slots < 0).sum())
    assert dead > 0, "a match through tombstones"
    assert kv.admit(b, m, len(b.prompt_ids) - m.length)
    assert (b.kv_slots.view()[: b.lock_start] == -1).all()
    check_ownership(kv, [b])
    kv.release(b)
    check_ownership(kv, [])
    assert cache.flush()
    assert kv.allocator.num_free_slots == kv.capacity


def test_a_match_stops_where_the_window_would_reach_a_tombstone():
    a = PagedAllocator((64 + 1) * P, P)
    cache = SWARadixCache(a, window=W)
    tokens = list(range(48))
    slots = a.alloc_pages(12)
    assert slots is not None
    slots = (slots[:, None] * P + np.arange(P)).reshape(-1)
    cache.insert_owned(CacheKey(tokens), slots, owned_from=0)
    cache.match_prefix(CacheKey(tokens[:16]))  # split at 16 and 32: three nodes
    cache.match_prefix(CacheKey(tokens[:32]))
    middle = cache.match_prefix(CacheKey(tokens[:32])).node
    assert isinstance(middle, WindowNode) and (middle.start, middle.end) == (16, 32)
    cache.match_prefix(CacheKey(tokens))  # the tail is the most recent: the head goes first
    freed = cache.evict(16)
    assert freed == 16
    cache.check()
    # [0,16) live? no: the least recent is the middle or head; whichever died, the match ends at a live window
    m = cache.match_prefix(CacheKey(tokens))
    live_from = int(np.flatnonzero(m.slots < 0).max()) + 1 if (m.slots < 0).any() else 0
    assert m.length == 0 or m.length - live_from >= W - 1 or live_from == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_interleavings_keep_ownership(seed):
    """Requests on shared prefixes, admitted, computed in chunks, decoded, preempted and finished in a random
    order under a small pool (evictions and tombstones happen): ownership stays exact after every operation, and
    a full release gives every page back."""
    rng = random.Random(seed)
    kv = KVCacheManager(num_slots=(80 + 1) * P, page_size=P, max_reqs=6, window=W)
    stems = [[s * 1000 + i for i in range(rng.randrange(20, 90))] for s in range(3)]
    running: list[Req] = []
    for step in range(300):
        op = rng.random()
        if op < 0.25 and len(running) < 5:
            stem = rng.choice(stems)
            prompt = stem[: rng.randrange(P, len(stem) + 1)] + [9] * rng.randrange(0, 12)
            r = new_req(f"r{step}", prompt)
            m = kv.match(r)
            if kv.admit(r, m, 0):
                running.append(r)
        elif op < 0.85 and running:
            r = rng.choice(running)
            chunk = rng.choice([1, 3, 8, 17])
            target = r.num_computed + chunk
            while r.num_tokens < target:
                r.output_ids.append(5000 + len(r.output_ids))
            n = target - r.num_computed
            if kv.alloc([r], [n]) is None:
                continue
            r.num_computed += n
            if r.num_computed <= len(r.prompt_ids):
                kv.cache_unfinished(r)
            kv.slide(r)
        elif running:
            r = running.pop(rng.randrange(len(running)))
            kv.release(r)
        check_ownership(kv, running)
    for r in running:
        kv.release(r)
    check_ownership(kv, [])
    assert kv.cache is not None and kv.cache.protected_size == 0
    assert kv.allocator.num_free_slots + kv.cache.evictable_size == kv.capacity
    assert kv.cache.flush()
    assert kv.allocator.num_free_slots == kv.capacity
