"""Chained hashes of token-id blocks: a compact, token-exact name for every block-aligned prefix.

``h[k]`` names ``tokens[: (k + 1) * block]`` and depends on every token before it, so two sequences share
``h[k]`` exactly when they share their first ``(k + 1) * block`` tokens (up to 64-bit collisions). Integers and
tuples of integers hash the same in every Python process, so hashes computed in a replica match those computed in a
router; a namespace (``extra_key``, e.g. a LoRA adapter) seeds the chain through a stable digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def chain_seed(extra_key: str | None) -> int:
    if extra_key is None:
        return 0
    return int.from_bytes(hashlib.blake2b(extra_key.encode(), digest_size=8).digest(), "little")


def block_hashes(tokens: Sequence[int], block: int, extra_key: str | None = None) -> list[int]:
    """Example::

    >>> a = block_hashes(list(range(100)), 32)
    >>> b = block_hashes(list(range(64)) + [7] * 40, 32)
    >>> len(a), a[:2] == b[:2], a[2] == b[2]
    (3, True, False)
    """
    out, h = [], chain_seed(extra_key)
    for start in range(0, len(tokens) - block + 1, block):
        h = hash((h, tuple(tokens[start : start + block])))
        out.append(h)
    return out


def longest_shared_prefix(hashes: Sequence[int], known: set[int] | frozenset[int], block: int) -> int:
    """Tokens of the longest block-aligned prefix whose hash is in ``known``."""
    best = 0
    for k, h in enumerate(hashes):
        if h in known:
            best = (k + 1) * block
    return best
