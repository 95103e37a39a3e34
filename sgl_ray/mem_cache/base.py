"""The prefix-cache seam: what the scheduler asks of RadixAttention's token radix tree.

A prefix cache maps token-id prefixes to the KV slots that already hold their keys and values. It is pure metadata
(numpy arrays of slot indices, no tensors), so it can live wherever the scheduler lives — in-process or inside the
global scheduler actor — while the KV tensors stay with the model shards.

Ownership of KV slots (the invariant every implementation keeps):

* A slot is owned by exactly one of: the allocator's free list, the cache (it is the value of a tree node), or one
  running request (it holds KV the request computed but has not handed to the cache yet).
* ``insert`` hands slots to the cache. For the leading part of the key that was already cached the cache keeps its
  own slots and reports how many tokens that was (``InsertResult.num_cached``); the caller then frees its duplicate
  slots for that range and switches the request over to the cache's slots.
* A node whose ``lock_ref`` is above zero (some running request uses it) is never evicted, and neither are its
  ancestors: locking a node locks the whole path up to the root.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import numpy as np


class CacheKey(NamedTuple):
    """Token ids plus a namespace: the same tokens under different ``extra_key`` (e.g. LoRA adapter) never match."""

    token_ids: tuple[int, ...] | list[int] | np.ndarray
    extra_key: str | None = None


class MatchResult(NamedTuple):
    """The longest cached prefix of a key.

    ``slots`` holds one KV slot per matched token (int64, length a multiple of ``page_size``); ``node`` is an opaque
    handle to the deepest matched node, used for ``inc_lock``/``dec_lock``.
    """

    slots: np.ndarray
    node: Any

    @property
    def length(self) -> int:
        return len(self.slots)


class InsertResult(NamedTuple):
    """``num_cached``: leading tokens of the key that were cached before this insert (caller frees its copies)."""

    num_cached: int
    node: Any


class BasePrefixCache(ABC):
    """Contract between the scheduler and a prefix cache.

    Only whole pages are cached: match lengths and insert lengths are truncated down to a multiple of ``page_size``.
    """

    page_size: int

    @abstractmethod
    def match_prefix(self, key: CacheKey) -> MatchResult:
        """Longest cached prefix of ``key``. Splits a node when the match ends inside it; refreshes LRU times."""

    @abstractmethod
    def insert(self, key: CacheKey, slots: np.ndarray) -> InsertResult:
        """Cache ``slots[i]`` as the KV of ``key.token_ids[i]`` (both truncated to whole pages)."""

    @abstractmethod
    def inc_lock(self, node: Any) -> None:
        """Protect ``node`` and its ancestors from eviction (one more running request uses them)."""

    @abstractmethod
    def dec_lock(self, node: Any) -> None:
        """Undo one ``inc_lock``; the path becomes evictable once no request holds it."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots (fewer if not possible) from unlocked leaves, least recently used
        first, giving them back to the allocator. Returns how many slots were freed."""

    @abstractmethod
    def flush(self) -> bool:
        """Drop every cached prefix. Refused (returns False) while any node is locked."""

    @property
    @abstractmethod
    def evictable_size(self) -> int:
        """Slots held by the cache that ``evict`` could free now."""

    @property
    @abstractmethod
    def protected_size(self) -> int:
        """Slots held by the cache on locked paths."""

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def summary(self) -> Any:
        """A compact description of what is cached (used by cache-aware routing); optional."""
        return None
