"""KV slot bookkeeping for the scheduler: allocator, prefix cache, request slots, and the table writes the runner
must apply.

Ownership (see ``sgl_ray.mem_cache.base``): a request's ``kv_slots[:tree_len]`` belong to the prefix cache (locked
through ``cache_node``); ``kv_slots[tree_len:]`` belong to the request until it hands them to the cache
(:meth:`cache_unfinished`, :meth:`release`) or frees them.

With ``window`` (every layer of the model attends within the last ``window`` positions), a request lets go of
what its window has left (:meth:`slide`): its own pages there are freed, its lock on the cache's nodes there is
dropped (they become evictable, see ``mem_cache.swa_radix_cache``), and ``kv_slots[:window_done]`` become -1.
It keeps the positions from ``n - window + 1`` on, ``n`` being its computed length cut to whole pages: what a
query past ``n`` reads, and what a later prefix match ending at ``n`` needs.

With ``swa_slots`` as well (a model mixing full-attention and windowed layers, ``mem_cache.hybrid_swa``), every
token keeps its full slot; ``slide`` frees only the SWA pages of the window's past (and drops the request's SWA
lock on the cache's nodes there), and ``kv_slots`` stays whole.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from sgl_ray.mem_cache.allocator import PagedAllocator
from sgl_ray.mem_cache.base import CacheKey, MatchResult
from sgl_ray.mem_cache.hybrid_swa import HybridSWARadixCache, SWASlotMap
from sgl_ray.mem_cache.radix_cache import RadixCache
from sgl_ray.mem_cache.swa_radix_cache import SWARadixCache
from sgl_ray.scheduler.request import Req

_EMPTY = np.zeros(0, dtype=np.int64)


class KVCacheManager:
    def __init__(
        self,
        num_slots: int,
        page_size: int,
        max_reqs: int,
        enable_prefix_cache: bool = True,
        window: int | None = None,
        swa_slots: int = 0,
    ) -> None:
        self.page_size = page_size
        self.window = window
        self.allocator = PagedAllocator(num_slots, page_size)
        self.cache: RadixCache | None = None
        # Hybrid pools (``swa_slots`` > 0): the windowed layers' own, smaller slot space
        self.slot_map: SWASlotMap | None = None
        self._hybrid: HybridSWARadixCache | None = None
        if swa_slots:
            if window is None:
                raise ValueError("swa_slots needs the windowed layers' window")
            self.slot_map = SWASlotMap(self.allocator, PagedAllocator(swa_slots, page_size))
        if enable_prefix_cache:
            if self.slot_map is not None:
                assert window is not None
                self.cache = self._hybrid = HybridSWARadixCache(self.slot_map, window)
            elif window is None:
                self.cache = RadixCache(self.allocator)
            else:
                self.cache = SWARadixCache(self.allocator, window)
        self._swa = self.cache if isinstance(self.cache, SWARadixCache) else None
        self.peak_swa_held = 0  # hybrid pools: most SWA slots held at once for running requests
        self.peak_held = 0  # most slots running requests held at once (their own and the cache's they lock)
        self.peak_running = 0  # most requests bound to request slots at once
        self.max_reqs = max_reqs
        self._free_req_slots: deque[int] = deque(range(max_reqs))
        self._table_writes: list[tuple[int, int, np.ndarray]] = []
        self._freed_req_slots: list[int] = []

    # --- capacity ---------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    @property
    def swa_capacity(self) -> int:
        """Allocatable slots of the SWA pool (hybrid pools), else 0."""
        return self.slot_map.swa.capacity if self.slot_map is not None else 0

    def slots_to_run(self, num_tokens: int, chunk: int | None) -> int:
        """Slots a request of ``num_tokens`` needs at once, alone: all of them, but with a window (and prefill in
        chunks) its window, a chunk and the pages they straddle. Hybrid pools: all of them in the full pool, and
        where the SWA pool cannot hold its window's share, that share scaled to the full pool (over capacity)."""
        windowed = num_tokens
        if self.window is not None and chunk is not None:
            windowed = min(num_tokens, self.window + chunk + 2 * self.page_size)
        if self.slot_map is None:
            return windowed
        if windowed <= self.swa_capacity:
            return num_tokens
        return max(num_tokens, -(-windowed * self.capacity // max(1, self.swa_capacity)))

    def held(self) -> int:
        """Slots held for running requests now: neither free nor evictable."""
        return self.capacity - self.available()

    def available(self) -> int:
        """Slots obtainable now: free plus evictable."""
        return self.allocator.num_free_slots + (self.cache.evictable_size if self.cache else 0)

    def swa_held(self) -> int:
        """Hybrid pools: SWA slots held for running requests now (neither free nor evictable)."""
        if self.slot_map is None:
            return 0
        evictable = self._hybrid.swa_evictable_size if self._hybrid is not None else 0
        return self.swa_capacity - self.slot_map.swa.num_free_slots - evictable

    def _note_peaks(self) -> None:
        self.peak_held = max(self.peak_held, self.held())
        if self.slot_map is not None:
            self.peak_swa_held = max(self.peak_swa_held, self.swa_held())

    @property
    def num_free_req_slots(self) -> int:
        return len(self._free_req_slots)

    # --- admission --------------------------------------------------------------------------------------------
    def match(self, req: Req) -> MatchResult | None:
        """Longest cached prefix usable by ``req``: at least one token is left to compute (its logits are needed),
        and no prompt position whose logprob is requested is skipped."""
        if self.cache is None:
            return None
        limit = req.num_tokens - 1
        if req.wants_input_logprobs:
            limit = min(limit, max(req.logprob_start_len, req.input_logprob_next, 1) - 1)
        limit -= limit % self.page_size
        if limit <= 0:
            return None
        return self.cache.match_prefix(CacheKey(req.fill_ids[:limit], req.extra_key))

    def admit(self, req: Req, match: MatchResult | None, num_new: int, reserve: float = 0.0) -> bool:
        """Bind ``req`` to a request slot, lock its cached prefix and allocate ``num_new`` slots after it — all or
        nothing. ``reserve`` slots must remain obtainable afterwards (decode headroom for running requests).

        The prefix is locked before memory is checked, so it never counts as evictable room for itself."""
        if not self._free_req_slots:
            return False
        node = match.node if match is not None else None
        prefix = match.slots if match is not None else _EMPTY
        lock_start = self._lock(node, len(prefix))
        slots = None
        if self.available() >= num_new + reserve:
            slots = self._alloc(
                np.array([len(prefix)]), np.array([prefix[-1] if len(prefix) else -1]), np.array([num_new])
            )
        if slots is None:
            self._unlock(node, lock_start)
            return False
        self._note_peaks()
        req.req_pool_idx = self._free_req_slots.popleft()
        self.peak_running = max(self.peak_running, self.max_reqs - len(self._free_req_slots))
        req.kv_slots.clear()
        req.kv_slots.extend(prefix)
        req.kv_slots.extend(slots)
        req.num_computed = req.tree_len = len(prefix)
        req.cache_node, req.lock_start, req.window_done = node, lock_start, 0
        if self._hybrid is not None:  # its SWA reach in the cache starts there (full slots are all kept)
            req.window_done = lock_start
        if self._swa is not None:  # what the window does not reach is not the request's to read
            req.kv_slots.view()[:lock_start] = -1
            req.window_done = lock_start
        if len(prefix):
            self._table_writes.append((req.req_pool_idx, 0, req.kv_slots.view()[: len(prefix)].copy()))
        return True

    def _keep_from(self, n: int) -> int:
        """First position whose KV a request of ``n`` computed tokens must keep (sliding-window models)."""
        assert self.window is not None
        return max(0, n - n % self.page_size - self.window + 1)

    def _lock(self, node, n: int) -> int:
        """Lock the cache path ending at ``node`` (``n`` tokens) that the request reads; returns its start."""
        if node is None or self.cache is None:
            return 0
        if self._swa is not None:
            return self._swa.lock(node, self._keep_from(n))
        if self._hybrid is not None:
            return self._hybrid.lock(node, self._keep_from(n))
        self.cache.inc_lock(node)
        return 0

    def _unlock(self, node, lock_start: int) -> None:
        if node is None or self.cache is None:
            return
        if self._swa is not None:
            self._swa.unlock(node, lock_start)
        elif self._hybrid is not None:
            self._hybrid.unlock(node, lock_start)
        else:
            self.cache.dec_lock(node)

    def slide(self, req: Req) -> None:
        """Sliding-window models: let go of what ``req``'s window has left (see the module notes)."""
        if self.window is None or req.req_pool_idx < 0:
            return
        keep = self._keep_from(req.num_computed)
        keep -= keep % self.page_size  # whole pages before it
        if keep <= req.window_done:
            return
        slots = req.kv_slots.view()
        done = req.window_done
        if self.slot_map is not None:  # hybrid pools: only the SWA pages go
            if self._hybrid is not None and req.cache_node is not None and done < req.tree_len:
                req.lock_start = self._hybrid.unlock_swa(req.cache_node, req.lock_start, below=keep)
                done = min(req.lock_start, req.tree_len)
            if keep > req.tree_len:
                self.slot_map.free_swa(slots[max(done, req.tree_len) : keep])
                done = keep
            req.window_done = done
            return
        if self._swa is not None and req.cache_node is not None and done < req.tree_len:
            req.lock_start = self._swa.unlock(req.cache_node, req.lock_start, below=keep)
            upto = min(req.lock_start, req.tree_len)
            slots[done:upto] = -1
            done = upto
        if keep > req.tree_len:  # its own pages there
            lo = max(done, req.tree_len)
            own = slots[lo:keep]
            self.allocator.free(own[own >= 0].copy())
            slots[lo:keep] = -1
            done = keep
        req.window_done = done

    def _alloc(self, seq: np.ndarray, last: np.ndarray, ext: np.ndarray) -> np.ndarray | None:
        """``allocator.alloc_extend``, evicting cached prefixes first when that can make room."""
        slots = self.allocator.alloc_extend(seq, last, ext)
        if slots is None and self.cache is not None:
            p = self.page_size
            need = (
                int(((seq + ext + p - 1) // p - (seq + p - 1) // p).sum()) * p - self.allocator.num_free_slots
            )
            if 0 < need <= self.cache.evictable_size:
                self.cache.evict(need)
                slots = self.allocator.alloc_extend(seq, last, ext)
        if slots is not None and self.slot_map is not None and not self.slot_map.map_new(slots):
            smap = self.slot_map
            need = smap.num_new_pages(slots) * self.page_size - smap.swa.num_free_slots
            if self._hybrid is None or self._hybrid.evict_swa(need) < need or not smap.map_new(slots):
                self.allocator.free(slots[slots % self.page_size == 0])  # the fresh full pages go back
                return None
        return slots

    def alloc(self, reqs: list[Req], extend_lens: list[int]) -> np.ndarray | None:
        """Slots for ``extend_lens[i]`` more tokens of each request (appended to its ``kv_slots``), evicting
        cached prefixes if needed. None (and nothing allocated) when the pool cannot hold them."""
        if not reqs:
            return _EMPTY
        seq = np.fromiter((len(r.kv_slots) for r in reqs), dtype=np.int64, count=len(reqs))
        last = np.fromiter(
            (r.kv_slots.view()[-1] if len(r.kv_slots) else -1 for r in reqs), np.int64, len(reqs)
        )
        ext = np.asarray(extend_lens, dtype=np.int64)
        slots = self._alloc(seq, last, ext)
        if slots is None:
            return None
        self._note_peaks()
        offset = 0
        for r, n in zip(reqs, extend_lens, strict=True):
            r.kv_slots.extend(slots[offset : offset + n])
            offset += n
        return slots

    # --- handing KV to the prefix cache -----------------------------------------------------------------------
    def _insert(self, req: Req) -> tuple[int, np.ndarray]:
        """Insert the request's computed whole pages; free its duplicates of what was already cached.
        Returns (inserted length, the request's slots after the insert)."""
        assert self.cache is not None
        n = req.num_computed - req.num_computed % self.page_size
        slots = req.kv_slots.view()
        if n <= req.tree_len:
            return req.tree_len, slots
        key = CacheKey(req.fill_ids[:n], req.extra_key)
        if self._swa is not None:
            self._swa.insert_owned(key, slots[:n].copy(), owned_from=req.tree_len)
            return n, slots
        if self._hybrid is not None:
            self._hybrid.insert_owned(key, slots[:n].copy(), owned_from=req.tree_len)
            return n, slots
        res = self.cache.insert(key, slots[:n].copy())
        if res.num_cached > req.tree_len:
            self.allocator.free(slots[req.tree_len : res.num_cached].copy())
        return n, slots

    def cache_unfinished(self, req: Req) -> None:
        """After a prefill chunk: share the computed prefix with other requests and re-lock it for this one."""
        if self.cache is None:
            return
        old_tree_len = req.tree_len
        n, slots = self._insert(req)
        if n == old_tree_len:
            return
        match = self.cache.match_prefix(CacheKey(req.fill_ids[:n], req.extra_key))
        assert match.length == n, "the prefix just inserted must match in whole"
        changed = np.nonzero(match.slots[old_tree_len:n] != slots[old_tree_len:n])[0]
        if len(changed):
            slots[old_tree_len:n] = match.slots[old_tree_len:n]
            self._table_writes.append((req.req_pool_idx, old_tree_len, match.slots[old_tree_len:n].copy()))
        lock_start = self._lock(match.node, n)
        self._unlock(req.cache_node, req.lock_start)
        req.cache_node, req.tree_len, req.lock_start = match.node, n, lock_start
        if self._hybrid is not None:
            req.window_done = lock_start
        if self._swa is not None:  # the match gave the tree's slots, stale ones too: keep what stays locked
            slots[:lock_start] = -1
            req.window_done = lock_start

    def release(self, req: Req) -> None:
        """The request stops running (finished, aborted or preempted): its computed prefix goes to the cache, the
        rest of its slots and its request slot are freed."""
        slots = req.kv_slots.view()
        if self.cache is not None:
            n, slots = self._insert(req)
            if len(slots) > n:
                self._free(slots[n:].copy())
            self._unlock(req.cache_node, req.lock_start)
        elif len(slots):
            self._free(slots[slots >= 0].copy())
        if req.req_pool_idx >= 0:
            self._free_req_slots.append(req.req_pool_idx)
            self._freed_req_slots.append(req.req_pool_idx)
        req.kv_slots.clear()
        req.req_pool_idx, req.cache_node, req.tree_len, req.lock_start, req.window_done = -1, None, 0, 0, 0

    def truncate(self, req: Req, n: int) -> None:
        """Forget the request's KV past its first ``n`` tokens (rejected jump-forward tokens): whole pages past
        them are freed; the rest of a partly used page stays the request's and its next allocation refills it."""
        assert n >= req.tree_len
        slots = req.kv_slots.view()
        keep = -(-n // self.page_size) * self.page_size
        if len(slots) > keep:
            self._free(slots[keep:].copy())
        req.kv_slots.truncate(n)
        req.num_computed = n

    def drop_tail(self, req: Req, n: int, num_computed: int) -> None:
        """Forget the last ``n`` of the request's slots, now ``num_computed`` tokens have KV. Overlap scheduling
        with speculation: the step in flight after a verify step starts where the rejected drafts were, so its
        worst-case slots past them are not needed. Whole pages past the rest are freed."""
        slots = req.kv_slots.view()
        end = len(slots) - n
        assert num_computed <= end and num_computed >= req.tree_len
        keep = -(-end // self.page_size) * self.page_size
        if len(slots) > keep:
            self._free(slots[keep:].copy())
        req.kv_slots.truncate(end)
        req.num_computed = num_computed

    def _free(self, slots: np.ndarray) -> None:
        """Free a request's own full slots (and, hybrid pools, their SWA pages)."""
        if self.slot_map is not None:
            self.slot_map.free(slots)
        else:
            self.allocator.free(slots)

    def flush(self) -> bool:
        return self.cache.flush() if self.cache is not None else True

    def take_swa_map_writes(self) -> tuple[np.ndarray, np.ndarray]:
        """Hybrid pools: (full pages, SWA pages; 0 for none) the device's map must take before the next step."""
        if self.slot_map is None:
            return _EMPTY, _EMPTY
        return self.slot_map.take_writes()

    # --- what the next plan must carry ---------------------------------------------------------------------------
    def take_table_writes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        writes, self._table_writes = self._table_writes, []
        if not writes:
            return _EMPTY, _EMPTY, _EMPTY
        reqs = np.concatenate([np.full(len(s), r, dtype=np.int64) for r, _, s in writes])
        pos = np.concatenate([np.arange(p, p + len(s), dtype=np.int64) for _, p, s in writes])
        # -1 (KV let go of, sliding windows): slot 0, which no query reads
        return reqs, pos, np.maximum(np.concatenate([s for _, _, s in writes]), 0).astype(np.int64)

    def take_freed_req_slots(self) -> list[int]:
        freed, self._freed_req_slots = self._freed_req_slots, []
        return freed
