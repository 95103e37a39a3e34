"""Packed token bitmasks: row ``i`` allows token ``t`` iff bit ``t % 32`` of ``mask[i, t // 32]`` is set.

On CPU the bits are unpacked with numpy (``unpackbits``); for a batch of 128 rows of a 49,152-token vocabulary
that took 12.6 ms on a 2-core VM, against 38 ms with xgrammar's CPU kernel when few tokens are allowed (the usual
case) and 16 ms with the lookup table below. On the GPU, and as the reference, a byte lookup table in plain torch
(no host sync).
"""

from __future__ import annotations

import numpy as np
import torch

_tables: dict[torch.device, torch.Tensor] = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] uint8: bit j of byte value b (little-endian bytes of the int32 words, as CPU and CUDA lay them
    out). Built on ``device`` itself, once: a copy from pageable host memory would wait for the stream, and the
    sampler would wait for the forward pass in flight."""
    table = _tables.get(device)
    if table is None:
        table = _tables[device] = (
            (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
        ).to(torch.uint8)
    return table


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 packed → [B, vocab_size] bool (True: allowed)."""
    table = _byte_bits(bitmask.device)
    octets = bitmask.contiguous().view(torch.uint8).int()  # [B, 4W]
    bits = torch.nn.functional.embedding(octets, table)  # [B, 4W, 8]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits [B, V] of disallowed tokens to -inf in place; ``bitmask`` [B, ceil(V/32)] int32."""
    if logits.device.type == "cpu":
        # little-endian words: token t is bit t % 8 of byte t // 8
        octets = bitmask.cpu().contiguous().numpy().view(np.uint8)
        allowed = np.unpackbits(octets, axis=1, count=logits.shape[-1], bitorder="little").view(np.bool_)
        return logits.masked_fill_(torch.from_numpy(allowed).logical_not_(), float("-inf"))
    bitmask = bitmask.to(logits.device, non_blocking=True)
    return logits.masked_fill_(~unpack_bitmask(bitmask, logits.shape[-1]), float("-inf"))
