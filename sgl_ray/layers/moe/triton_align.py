"""Sorting the (token, expert) pairs of a batch by local expert, on the GPU, without a host sync.

The grouped GEMMs run over blocks of ``BLOCK_M`` rows that all belong to one expert. The pairs ``p = t * k + j``
(``topk.ids`` flattened) are grouped by local expert ``e = ids[p] - first_expert`` (pairs outside
``[0, E)`` dropped), in pair order within an expert, and each expert's segment is padded to a multiple of
``BLOCK_M`` with the sentinel ``P = T * k``::

    sorted_ids:   | e=0: p p p P | e=2: p p p p p P P P | e=3: p P P P | ...... (never read) |
    block_expert: |      0       |     2       2        |      3       | -1 -1 -1 ...        |
                  ^ rows [0, num_padded) are in use: num_padded = sum_e ceil(count_e / BLOCK_M) * BLOCK_M

Buffer sizes are static upper bounds (CUDA graphs): at most ``min(E, P)`` experts get pairs, so
``blocks <= P // BLOCK_M + min(E, P)`` (:func:`max_blocks`).

Two launches over chunks of ``CHUNK`` pairs (``C`` chunks):

1. *count*: each chunk's per-expert histogram ``chunk_counts[c, e]``; also the expert-load statistic
   (``counts[g] += 1`` for every pair of a counted token with a global id ``g >= 0``, by int64 atomics);
2. *place*: every chunk sums the histograms (all of them, and those of the chunks before it), so each knows
   the start of every expert's segment and where its own pairs go; within a chunk, a pair's rank among the
   earlier pairs of its expert is a cumulative sum over a one-hot [ROWS, E_PAD] tile. Chunk 0 also writes the
   padding sentinels, ``block_expert`` and ``num_padded``.

The result is deterministic (no atomics decide positions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_MAX_CHUNKS = 64  # chunks per launch, about: every chunk of the place kernel reads all chunks' histograms
_TILE = 4096  # elements of a one-hot [ROWS, E_PAD] tile


class SortedPairs(NamedTuple):
    sorted_ids: torch.Tensor  # [max_blocks * block_m] int32 pair ids t * k + j (num_pairs: padding)
    block_expert: torch.Tensor  # [max_blocks] int32 local expert of each block, -1 past the rows in use
    num_padded: torch.Tensor  # [1] int32 rows in use, a multiple of block_m
    max_blocks: int  # the static bound the buffers are sized for


def max_blocks(num_pairs: int, num_local: int, block_m: int) -> int:
    """Blocks of ``block_m`` rows that ``num_pairs`` pairs over ``num_local`` experts can need at most."""
    return num_pairs // block_m + min(num_local, num_pairs)


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(
    Ids, Counts, CountMask, ChunkCounts, num_pairs, first_expert, num_local, top_k,
    CHUNK: tl.constexpr, ROWS: tl.constexpr, E_PAD: tl.constexpr, HAS_COUNTS: tl.constexpr,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    hist = tl.zeros([E_PAD], dtype=tl.int32)
    for r0 in range(0, CHUNK, ROWS):
        offs = c * CHUNK + r0 + tl.arange(0, ROWS)  # [ROWS] pair ids
        valid = offs < num_pairs
        gid = tl.load(Ids + offs, mask=valid, other=-1)
        if HAS_COUNTS:  # the load statistic: every routed pair of a counted token, local or not
            counted = valid & (gid >= 0)
            if HAS_MASK:
                counted = counted & (tl.load(CountMask + offs // top_k, mask=valid, other=0) != 0)
            tl.atomic_add(Counts + gid, tl.full([ROWS], 1, tl.int64), mask=counted)
        e = gid - first_expert
        local = valid & (e >= 0) & (e < num_local)
        hit = (e[:, None] == experts[None, :]) & local[:, None]  # [ROWS, E_PAD]
        hist += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(ChunkCounts + c * E_PAD + experts, hist)


@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "num_blocks"])
def _place_kernel(
    Ids, ChunkCounts, SortedIds, BlockExpert, NumPadded, num_pairs, first_expert, num_local, num_chunks,
    num_blocks, CHUNK: tl.constexpr, ROWS: tl.constexpr, E_PAD: tl.constexpr, PREFIX_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, FILL: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)  # pairs of each expert in the batch
    before = tl.zeros([E_PAD], dtype=tl.int32)  # ... in the chunks before this one
    for r0 in range(0, num_chunks, PREFIX_ROWS):
        rows = r0 + tl.arange(0, PREFIX_ROWS)
        blk = tl.load(
            ChunkCounts + rows[:, None] * E_PAD + experts[None, :], mask=(rows < num_chunks)[:, None], other=0
        )  # [PREFIX_ROWS, E_PAD]
        total += tl.sum(blk, axis=0)
        before += tl.sum(tl.where((rows < c)[:, None], blk, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.cumsum(padded, axis=0) - padded  # first row of each expert's segment
    cursor = start + before  # where this chunk's next pair of each expert goes
    for r0 in range(0, CHUNK, ROWS):
        offs = c * CHUNK + r0 + tl.arange(0, ROWS)
        valid = offs < num_pairs
        e = tl.load(Ids + offs, mask=valid, other=-1) - first_expert
        local = valid & (e >= 0) & (e < num_local)
        hit = ((e[:, None] == experts[None, :]) & local[:, None]).to(tl.int32)  # [ROWS, E_PAD] one-hot
        rank = tl.cumsum(hit, axis=0) - hit  # earlier rows of this tile with the same expert
        dest = tl.sum(hit * (rank + cursor[None, :]), axis=1)  # [ROWS]
        tl.store(SortedIds + dest, offs, mask=local)
        cursor += tl.sum(hit, axis=0)
    if c == 0:
        rows_used = tl.sum(padded, axis=0)
        tl.store(NumPadded, rows_used)
        # each expert's padding rows [start + total, start + padded) get the sentinel
        pad = (start + total)[:, None] + tl.arange(0, BLOCK_M)[None, :]  # [E_PAD, BLOCK_M]
        sentinel = tl.zeros([E_PAD, BLOCK_M], dtype=tl.int32) + num_pairs
        tl.store(SortedIds + pad, sentinel, mask=pad < (start + padded)[:, None])
        block_end = (start + padded) // BLOCK_M  # [E_PAD] one past each expert's last block
        for b0 in range(0, num_blocks, FILL):
            b = b0 + tl.arange(0, FILL)
            # the owner of block b: the number of experts whose blocks all end at or before it
            owner = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
            owner = tl.where(b < rows_used // BLOCK_M, owner, -1)
            tl.store(BlockExpert + b, owner, mask=b < num_blocks)


def sort_pairs(
    ids: torch.Tensor,  # [T, k] int32 global expert ids, contiguous
    first_expert: int,
    num_local: int,
    block_m: int,
    counts: torch.Tensor | None = None,  # [num_global_experts] int64, incremented in place
    count_mask: torch.Tensor | None = None,  # [T] bool
    empty: Callable[..., torch.Tensor] = torch.empty,
) -> SortedPairs:
    """Pairs grouped by local expert and padded per expert to ``block_m`` rows (see the module docstring);
    two launches, buffer sizes from the shapes alone."""
    num_pairs, top_k = ids.numel(), ids.shape[1]
    e_pad = max(16, triton.next_power_of_2(num_local))
    rows = max(16, min(256, _TILE // e_pad))
    chunk = rows * triton.next_power_of_2(max(1, triton.cdiv(num_pairs, rows * _MAX_CHUNKS)))
    num_chunks = triton.cdiv(num_pairs, chunk)
    blocks = max_blocks(num_pairs, num_local, block_m)
    dev = ids.device
    chunk_counts = empty((num_chunks, e_pad), dtype=torch.int32, device=dev)
    sorted_ids = empty((blocks * block_m,), dtype=torch.int32, device=dev)
    block_expert = empty((blocks,), dtype=torch.int32, device=dev)
    num_padded = empty((1,), dtype=torch.int32, device=dev)
    _count_kernel[(num_chunks,)](
        ids, counts if counts is not None else chunk_counts,
        count_mask if count_mask is not None else ids, chunk_counts, num_pairs, first_expert, num_local, top_k,
        CHUNK=chunk, ROWS=rows, E_PAD=e_pad, HAS_COUNTS=counts is not None, HAS_MASK=count_mask is not None,
    )  # fmt: skip
    _place_kernel[(num_chunks,)](
        ids, chunk_counts, sorted_ids, block_expert, num_padded, num_pairs, first_expert, num_local, num_chunks,
        blocks, CHUNK=chunk, ROWS=rows, E_PAD=e_pad,
        PREFIX_ROWS=max(1, _TILE // e_pad), BLOCK_M=block_m,
        FILL=max(16, min(1024, _TILE // e_pad)),
    )  # fmt: skip
    return SortedPairs(sorted_ids, block_expert, num_padded, blocks)
