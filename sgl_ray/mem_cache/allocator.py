"""Paged free list of KV slots.

Slot layout (``page_size = 4`` shown)::

    slot:  0 1 2 3 | 4 5 6 7 | 8 9 10 11 | ...
    page:  0       | 1       | 2         | ...
           reserved  allocatable pages 1..num_pages

Slot ``s`` lives in page ``s // page_size`` at offset ``s % page_size``. Page 0 is never handed out: its slots are a
harmless write target for padded tokens. Pure numpy, so it can live with the scheduler, away from the KV tensors.
"""

from __future__ import annotations

import numpy as np


class PagedAllocator:
    """FIFO free list of pages.

    Invariants: every page ``1..num_pages`` is either in the free list exactly once or owned by exactly one holder
    (a request or the prefix cache). Allocation takes pages from the head of the free list; freed pages go to the
    tail in the order given, so the sequence of slots handed out is deterministic. Initially the free list is
    ``1, 2, ..., num_pages``.
    """

    def __init__(self, num_slots: int, page_size: int = 1) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_slots % page_size != 0:
            raise ValueError(f"num_slots ({num_slots}) must be a multiple of page_size ({page_size})")
        if num_slots // page_size < 2:
            raise ValueError(f"need at least 2 pages (1 reserved), got {num_slots // page_size}")
        self._page_size = page_size
        self._num_pages = num_slots // page_size - 1
        # Ring buffer of free page ids: the free list is _ring[_head : _head + _count] (mod num_pages). It can never
        # hold more than num_pages entries, so it never overflows.
        self._ring = np.empty(self._num_pages, dtype=np.int64)
        self._is_free = np.zeros(self._num_pages + 1, dtype=bool)  # indexed by page id; page 0 always False
        self.clear()

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def num_pages(self) -> int:
        """Allocatable pages (the reserved page 0 excluded)."""
        return self._num_pages

    @property
    def capacity(self) -> int:
        """Allocatable slots."""
        return self._num_pages * self._page_size

    @property
    def num_free_pages(self) -> int:
        return self._count

    @property
    def num_free_slots(self) -> int:
        return self._count * self._page_size

    def clear(self) -> None:
        """Make every page free again, in ascending order."""
        self._ring[:] = np.arange(1, self._num_pages + 1, dtype=np.int64)
        self._head = 0
        self._count = self._num_pages
        self._is_free[1:] = True

    def alloc_pages(self, n: int) -> np.ndarray | None:
        """Take ``n`` pages from the head of the free list (int64 page ids), or None (taking nothing) if short."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self._count:
            return None
        end = self._head + n
        if end <= self._num_pages:
            pages = self._ring[self._head : end].copy()
        else:
            pages = np.concatenate((self._ring[self._head :], self._ring[: end - self._num_pages]))
        self._head = end % self._num_pages
        self._count -= n
        self._is_free[pages] = False
        return pages

    def alloc_extend(
        self, seq_lens: np.ndarray, last_slots: np.ndarray, extend_lens: np.ndarray
    ) -> np.ndarray | None:
        """Slots for ``extend_lens[i]`` more tokens of each sequence, concatenated in request order (int64).

        Sequence ``i`` has ``seq_lens[i]`` tokens and its last token sits in slot ``last_slots[i]``. If that page is
        partially filled (``seq_lens[i] % page_size != 0``) its remaining slots are used first, then fresh pages.
        ``last_slots[i]`` is ignored (pass -1) when the sequence ends on a page boundary. Returns None, allocating
        nothing, if the free pages do not cover the whole batch.

        Algorithm: everything is computed per token with numpy (no Python loop over requests). Token ``j`` of
        request ``i`` either continues the partial page (``j < tail[i]``: slot ``last_slots[i] + 1 + j``) or is token
        ``k = j - tail[i]`` of the request's fresh pages (page ``pages[first_page[i] + k // page_size]``, offset
        ``k % page_size``).
        """
        ps = self._page_size
        extend_lens = np.asarray(extend_lens, dtype=np.int64)
        if ps == 1:  # every token is its own page: nothing partial to continue
            return self.alloc_pages(int(extend_lens.sum()))

        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        last_slots = np.asarray(last_slots, dtype=np.int64)
        used = seq_lens % ps  # tokens already in the last page (0: the sequence ends on a page boundary)
        partial = used > 0
        if np.any(partial & (last_slots % ps != used - 1)):
            raise ValueError("last_slots do not match seq_lens (offset of the last token within its page)")
        tail = np.minimum(np.where(partial, ps - used, 0), extend_lens)  # tokens that fit in the partial page
        num_new_pages = (extend_lens - tail + ps - 1) // ps
        pages = self.alloc_pages(int(num_new_pages.sum()))
        if pages is None:
            return None

        total = int(extend_lens.sum())
        if total == len(extend_lens) and np.all(
            extend_lens == 1
        ):  # decode: one token each, at most one page each
            out = last_slots + 1
            out[num_new_pages == 1] = pages * ps
            return out
        starts = np.cumsum(extend_lens) - extend_lens  # first output position of each request
        first_page = np.cumsum(num_new_pages) - num_new_pages  # first index into `pages` of each request
        req = np.repeat(np.arange(len(extend_lens)), extend_lens)  # [total] request of each output token
        j = np.arange(total, dtype=np.int64) - starts[req]  # [total] token index within its request
        k = j - tail[req]  # [total] token index within the request's fresh pages (< 0: in the partial page)
        out = last_slots[req] + 1 + j
        fresh = k >= 0
        k, req = k[fresh], req[fresh]
        out[fresh] = pages[first_page[req] + k // ps] * ps + k % ps
        return out

    def free(self, slots: np.ndarray) -> None:
        """Give back the pages covering ``slots`` (the caller owns them wholly), in order of first appearance.

        Raises ValueError for the reserved page or a page that is already free; nothing is freed then.
        """
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return
        pages = slots // self._page_size
        _, first = np.unique(pages, return_index=True)
        if len(first) != len(pages):
            pages = pages[np.sort(first)]
        if np.any(pages < 1) or np.any(pages > self._num_pages):
            raise ValueError(f"cannot free slots outside the allocatable pages: {slots}")
        if np.any(self._is_free[pages]):
            raise ValueError(f"double free of pages {pages[self._is_free[pages]]}")
        n = len(pages)
        tail = (self._head + self._count) % self._num_pages
        end = tail + n
        if end <= self._num_pages:
            self._ring[tail:end] = pages
        else:
            split = self._num_pages - tail
            self._ring[tail:] = pages[:split]
            self._ring[: end - self._num_pages] = pages[split:]
        self._count += n
        self._is_free[pages] = True
