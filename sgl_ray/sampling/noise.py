"""Counter-based random noise: a pure function of ``(seed, position, token_id)``.

Per-request seeds without one ``torch.Generator`` per request: every random number the sampler draws is a hash of
the request's seed, the sequence position being sampled and the vocabulary index, computed with vectorised integer
tensor ops. A seeded request therefore draws the same noise whatever else shares its batch, in whatever order, and
again after preemption and recompute.

Arithmetic invariant: all hash state lives in int64 tensors but is kept in ``[0, 2**32)``, and every multiplier is
below ``2**31``, so no product reaches ``2**63`` — the hash never relies on signed overflow and gives the same bits
on CPU and CUDA. The mixer is the two-multiply "lowbias32" shape (xorshift-multiply, twice) with constants from
Chris Wellons' hash-prospector search, both of which happen to be below ``2**31``.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x21F0AAAD
_MUL2 = 0x735A2D97
_GOLDEN = 0x9E3779B1  # odd: multiplying by it is a bijection mod 2**32; spreads consecutive token ids
_SEED_SALT = 0x5BD1E995
_UNIT = 1.0 / (1 << 23)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit mixer on an int64 tensor holding values in ``[0, 2**32)``; mixes ``x`` in place."""
    tmp = torch.empty_like(x)  # one scratch buffer for the three shifts
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp))
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp))
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp))
    return x


def token_keys(token_ids: torch.Tensor) -> torch.Tensor:
    """Spread token ids (any shape, int64, each below ``2**31``) over 32 bits before they meet the row key."""
    return (token_ids * _GOLDEN).bitwise_and_(_MASK32)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per 63-bit seed: [N] int64 in ``[0, 2**63)`` -> [N] int64 in ``[0, 2**32)``.

    Computed once per request (at admission), so a sampling step only mixes in the position.
    """
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    return mix32(mix32(lo ^ _SEED_SALT) ^ hi)


def row_keys(seed_key: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row: seed_key [B] from :func:`seed_keys`, positions [B] int64. Returns [B] int64."""
    return mix32(seed_key ^ (positions & _MASK32))


def uniform(keys: torch.Tensor, token_key: torch.Tensor) -> torch.Tensor:
    """Uniform floats in the open interval (0, 1), one per (row, token).

    keys: [B] from :func:`row_keys`; token_key: [B, K] or [K] from :func:`token_keys`. Returns [B, K] float32.
    """
    return to_unit(mix32(keys.unsqueeze(-1) ^ token_key))


def to_unit(bits: torch.Tensor) -> torch.Tensor:
    """Map 32-bit hashes (int64 in ``[0, 2**32)``, consumed in place) to float32 in (0, 1).

    Keeps the top 23 bits ``h`` and returns ``(h + 0.5) / 2**23``: every value is exact in float32 (24 significant
    bits), so the result is never 0 or 1 and ``log(-log(u))`` is always finite.
    """
    u = bits.bitwise_right_shift_(9).to(torch.float32)
    return u.add_(0.5).mul_(_UNIT)


def log_exponential(keys: torch.Tensor, token_key: torch.Tensor) -> torch.Tensor:
    """``log(E)`` for standard exponential ``E = -log(u)``, i.e. minus a standard Gumbel; shape as :func:`uniform`.

    ``argmax(z - log_exponential(...))`` draws from ``softmax(z)`` (the Gumbel-max trick).
    """
    return uniform(keys, token_key).log_().neg_().log_()
