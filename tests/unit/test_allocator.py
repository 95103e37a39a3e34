"""PagedAllocator: exact slots handed out, FIFO free-list order, all-or-nothing batches, misuse detection."""

from __future__ import annotations

import numpy as np
import pytest

from sgl_ray.mem_cache.allocator import PagedAllocator


def _arr(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        PagedAllocator(10, page_size=4)  # not a multiple
    with pytest.raises(ValueError):
        PagedAllocator(4, page_size=4)  # only the reserved page
    with pytest.raises(ValueError):
        PagedAllocator(1)


def test_sizes() -> None:
    a = PagedAllocator(32, page_size=4)
    assert (a.page_size, a.num_pages, a.capacity, a.num_free_slots) == (4, 7, 28, 28)
    a.alloc_pages(2)
    assert a.num_free_slots == 20
    assert a.num_free_pages == 5


def test_initial_order_and_fifo_reuse() -> None:
    a = PagedAllocator(8)
    np.testing.assert_array_equal(a.alloc_pages(3), _arr(1, 2, 3))
    a.free(_arr(2, 1))
    # Remaining head first (4..7), then freed pages in the order given.
    np.testing.assert_array_equal(a.alloc_pages(6), _arr(4, 5, 6, 7, 2, 1))
    assert a.alloc_pages(1) is None
    assert a.num_free_slots == 0


def test_alloc_pages_short_allocates_nothing() -> None:
    a = PagedAllocator(16, page_size=4)
    assert a.alloc_pages(4) is None
    assert a.num_free_pages == 3
    np.testing.assert_array_equal(a.alloc_pages(3), _arr(1, 2, 3))
    assert a.alloc_pages(0).dtype == np.int64


def test_ring_wraparound_keeps_order() -> None:
    a = PagedAllocator(5)  # pages 1..4
    for _ in range(3):
        got = a.alloc_pages(3)
        a.free(got[::-1])
    # [1 2 3 4] -take 3-> [4] -free 3 2 1-> [4 3 2 1] -take 3-> [1] -free 2 3 4-> [1 2 3 4] -take 3-> [4] -free-> ...
    np.testing.assert_array_equal(a.alloc_pages(4), _arr(4, 3, 2, 1))


def test_free_pages_of_slots_in_first_appearance_order() -> None:
    a = PagedAllocator(20, page_size=4)  # pages 1..4
    a.alloc_pages(4)
    a.free(_arr(13, 12, 5, 4, 6, 7))  # pages 3, 1
    np.testing.assert_array_equal(a.alloc_pages(2), _arr(3, 1))


def test_double_free_and_reserved_page_raise() -> None:
    a = PagedAllocator(16, page_size=4)
    pages = a.alloc_pages(2)  # 1, 2
    a.free(pages * 4)
    with pytest.raises(ValueError):
        a.free(_arr(4))  # page 1 again
    with pytest.raises(ValueError):
        a.free(_arr(0))  # reserved page
    with pytest.raises(ValueError):
        a.free(_arr(16))  # beyond the pool
    b = PagedAllocator(8)
    b.alloc_pages(2)
    with pytest.raises(ValueError):
        b.free(_arr(1, 3))  # page 3 was never allocated: nothing is freed
    assert b.num_free_pages == 5


def test_clear() -> None:
    a = PagedAllocator(8)
    a.alloc_pages(5)
    a.free(_arr(3))
    a.clear()
    assert a.num_free_slots == 7
    np.testing.assert_array_equal(a.alloc_pages(7), _arr(1, 2, 3, 4, 5, 6, 7))


def test_alloc_extend_page_size_1() -> None:
    a = PagedAllocator(16)
    out = a.alloc_extend(_arr(0, 5, 2), _arr(-1, 9, 3), _arr(3, 1, 2))
    np.testing.assert_array_equal(out, _arr(1, 2, 3, 4, 5, 6))
    assert a.alloc_extend(_arr(0), _arr(-1), _arr(10)) is None  # 9 free
    assert a.num_free_slots == 9


def test_alloc_extend_page_size_4_partial_pages() -> None:
    a = PagedAllocator(64, page_size=4)  # pages 1..15
    a.alloc_pages(3)  # pages 1, 2, 3 belong to the requests below
    # req0: empty, 6 tokens -> pages 4, 5 (slots 16..21)
    # req1: 5 tokens, last in slot 4 (page 1, offset 0): slots 5, 6, 7 fill page 1, then page 6 (24, 25)
    # req2: 8 tokens (page boundary, last_slot ignored): 1 token on page 7 (slot 28)
    # req3: 10 tokens, last in slot 13 (page 3, offset 1): 2 tokens fit (14, 15), no new page
    out = a.alloc_extend(_arr(0, 5, 8, 10), _arr(-1, 4, -1, 13), _arr(6, 5, 1, 2))
    expected = [16, 17, 18, 19, 20, 21, 5, 6, 7, 24, 25, 28, 14, 15]
    np.testing.assert_array_equal(out, _arr(*expected))
    assert out.dtype == np.int64
    assert a.num_free_pages == 15 - 3 - 4


def test_alloc_extend_decode_batch_page_size_4() -> None:
    a = PagedAllocator(64, page_size=4)
    a.alloc_pages(2)  # pages 1, 2
    # Lengths 4 (boundary), 6 (last slot 9 on page 2), 3 (last slot 6 on page 1), 8 (boundary).
    out = a.alloc_extend(_arr(4, 6, 3, 8), _arr(-1, 9, 6, -1), _arr(1, 1, 1, 1))
    np.testing.assert_array_equal(out, _arr(12, 10, 7, 16))  # new pages 3 and 4


def test_alloc_extend_all_or_nothing() -> None:
    a = PagedAllocator(16, page_size=4)  # 3 pages
    a.alloc_pages(1)
    # Needs 1 page + 2 pages = 3 > 2 free.
    assert a.alloc_extend(_arr(0, 2), _arr(-1, 5), _arr(4, 10)) is None
    assert a.num_free_pages == 2
    # Filling the partial page needs no new page even when none are free.
    a.alloc_pages(2)
    np.testing.assert_array_equal(a.alloc_extend(_arr(2), _arr(5), _arr(2)), _arr(6, 7))


def test_alloc_extend_rejects_inconsistent_last_slot() -> None:
    a = PagedAllocator(16, page_size=4)
    with pytest.raises(ValueError):
        a.alloc_extend(_arr(3), _arr(4), _arr(1))  # 3 tokens end at offset 2, slot 4 is offset 0
