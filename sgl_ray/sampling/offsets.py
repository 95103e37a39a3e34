"""Rows that sample as if some tokens were already emitted: offsets to their slot's token statistics.

A speculative verify entry samples every row of its chunk ``[x, d_1..d_k]`` at once, before any of them is
emitted, yet row ``i`` must see the penalties and the ``min_new_tokens`` mask that decoding without speculation
would see after ``d_1..d_i`` (with tree drafts: after the node's ancestors and the node). :class:`RowOffsets`
carries those tokens as a list of ``(row, token)`` pairs added to each row's gathered output counts, and how many
tokens each row counts as generated (:func:`~sgl_ray.sampling.penalties.process_logits`). :class:`ChunkPaths`
builds them on the device from each chunk's tokens and which of its columns precede which::

    chunk columns:   x    d_1   d_2   d_3
    row 2 counts:         d_1   d_2           (path[2] = [F, T, T, F]; column 0, x, is in the state already)

Every row gets one pair per column (weight 0 where the column is not on its path), so the number of pairs is known
on the host and building them needs no device sync.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from sgl_ray.transfer import to_device


class RowOffsets(NamedTuple):
    """Tokens rows of a batch count as emitted on top of their slot's ``output_counts`` / ``num_generated``."""

    rows: torch.Tensor  # [P] int64 batch row of each pair
    tokens: torch.Tensor  # [P] int64
    weights: torch.Tensor  # [P] int32: 1 counts the token once more for the row, 0 is padding
    generated: torch.Tensor  # [B] int64 tokens each row counts as generated (its pairs' weights summed)


class ChunkPaths(NamedTuple):
    """The chunks of ``E`` batch entries, ``C`` columns each; only entries whose sampling reads the counts
    (penalties, ``min_new_tokens``) have tokens and paths."""

    index: np.ndarray  # [E] host: each entry's row of ``tokens`` / ``path``, -1 where its rows count nothing
    tokens: torch.Tensor  # [Ec, C] int64 token of each column
    path: torch.Tensor  # [Ec, C, C] bool: column j counts as emitted for column i's row (column 0 never)

    def offsets(self, rows: np.ndarray, entries: np.ndarray, cols: np.ndarray, num_rows: int) -> RowOffsets:
        """The offsets of a batch of ``num_rows`` rows where row ``rows[r]`` is column ``cols[r]`` of entry
        ``entries[r]`` (all three [R], host); other rows count nothing."""
        dev = self.tokens.device
        idx = self.index[entries]
        keep = idx >= 0
        rows, idx, cols = rows[keep], idx[keep], cols[keep]
        c = self.tokens.shape[1]
        idx_dev = to_device(idx, dev)
        counted = self.path[idx_dev, to_device(cols, dev)]  # [R', C]
        generated = torch.zeros(num_rows, dtype=torch.int64, device=dev)
        generated[to_device(rows, dev)] = counted.sum(dim=1)
        return RowOffsets(
            to_device(np.repeat(rows, c), dev),
            self.tokens[idx_dev].reshape(-1),
            counted.reshape(-1).to(torch.int32),
            generated,
        )


def chain_paths(lens: np.ndarray, width: int) -> np.ndarray:
    """[E, width, width] bool paths of chains ``[x, d_1..d_n]`` (``lens``: n of each, at most ``width - 1``):
    row i counts ``d_1..d_min(i, n)`` (rows past a chain's end count the whole chain)."""
    col = np.arange(width)
    upto = np.minimum(col[None, :, None], lens[:, None, None])  # [E, width, 1]
    return (col[None, None, :] >= 1) & (col[None, None, :] <= upto)
