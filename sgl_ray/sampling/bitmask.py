"""Packed token bitmasks: row ``i`` allows token ``t`` iff bit ``t % 32`` of ``mask[i, t // 32]`` is set.

On CPU the mask is applied with xgrammar's native kernel when it is installed (several times faster than tensor
ops there); elsewhere, and as the reference, with a byte lookup table in plain torch (no host sync).
"""

from __future__ import annotations

import torch

# [256, 8] uint8: bit j of byte value b (little-endian bytes of the int32 words, as CPU and CUDA lay them out)
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 packed → [B, vocab_size] bool (True: allowed)."""
    table = _BYTE_BITS.to(bitmask.device)
    octets = bitmask.contiguous().view(torch.uint8).int()  # [B, 4W]
    bits = torch.nn.functional.embedding(octets, table)  # [B, 4W, 8]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits [B, V] (float32) of disallowed tokens to -inf in place; ``bitmask`` [B, ceil(V/32)] int32."""
    bitmask = bitmask.to(logits.device, non_blocking=True)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and _cpu_kernel(logits, bitmask):
        return logits
    return logits.masked_fill_(~unpack_bitmask(bitmask, logits.shape[-1]), float("-inf"))


def _cpu_kernel(logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    try:
        from xgrammar import apply_token_bitmask_inplace
    except ImportError:
        return False
    apply_token_bitmask_inplace(logits, bitmask.contiguous(), vocab_size=logits.shape[-1], backend="cpu")
    return True
