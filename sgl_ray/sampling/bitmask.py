"""Packed token bitmasks: row ``i`` allows token ``t`` iff bit ``t % 32`` of ``mask[i, t // 32]`` is set."""

from __future__ import annotations

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 packed → [B, vocab_size] bool (True: allowed). Works on any device, no host sync."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1  # [B, W, 32]
    return allowed.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits [B, V] of disallowed tokens to -inf in place; ``bitmask`` [B, ceil(V/32)] int32."""
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    return logits.masked_fill_(~allowed, float("-inf"))
