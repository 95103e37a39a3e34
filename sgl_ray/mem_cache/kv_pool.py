"""KV tensors: one key and one value buffer per layer, indexed by token slot.

The slot layout (pages, which request owns which slot) is decided by the scheduler's allocator; this pool only
stores tensors. Slot 0 belongs to the reserved page and is a harmless target for padding writes.
"""

from __future__ import annotations

import torch


class KVPool:
    """``k_buffers[layer]`` and ``v_buffers[layer]`` are ``[num_slots, num_kv_heads, head_dim]``."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        shape = (num_slots, num_kv_heads, head_dim)
        # Uninitialised except the reserved slot 0: padded reads hit it and must stay finite (masked scores times
        # NaN would still be NaN); every other slot is written before it is read.
        self.k_buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for buf in self.k_buffers + self.v_buffers:
            buf[0].zero_()

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ([T, num_kv_heads, head_dim]) at slots ``loc`` ([T])."""
        if k.dtype != self.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        self.k_buffers[layer_id].index_copy_(0, loc, k)
        self.v_buffers[layer_id].index_copy_(0, loc, v)

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.k_buffers + self.v_buffers)


class ReqToTokenTable:
    """``table[req_pool_idx, pos]`` = KV slot of token ``pos`` of the request bound to ``req_pool_idx``.

    The scheduler decides every entry and ships the writes with each step; the runner applies them here.
    """

    def __init__(self, max_reqs: int, max_context_len: int, device: torch.device) -> None:
        self.table = torch.zeros((max_reqs, max_context_len), dtype=torch.int64, device=device)

    def write(self, req_idx: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> None:
        self.table[req_idx, pos] = slots


class MLAKVPool:
    """The KV pool of a model with multi-head latent attention (DeepSeek-V2/V3, Kimi-K2; ``sgl_ray.attention.mla``):
    ``latent_buffers[layer]`` is ``[num_slots, latent_dim]``, one compressed latent per token slot — the normed
    ``kv_lora_rank`` values every head's key and value are up-projected from, then the ``qk_rope_head_dim`` values
    of the rotated key shared by all heads::

        slot s:  | c_kv (kv_lora_rank, e.g. 512) | k_pe (qk_rope_head_dim, e.g. 64) |

    Slots mean what they mean in :class:`KVPool` (the allocator, radix cache and preemption deal in slot indices
    only); ``head_dim`` is the latent's width, so code sizing by ``head_dim`` and ``dtype`` sees what a slot holds.
    """

    def __init__(
        self, num_slots: int, num_layers: int, latent_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_slots = num_slots
        self.head_dim = latent_dim
        self.dtype = dtype
        self.device = device
        # Uninitialised except the reserved slot 0 (see KVPool).
        self.latent_buffers = [
            torch.empty((num_slots, latent_dim), dtype=dtype, device=device) for _ in range(num_layers)
        ]
        for buf in self.latent_buffers:
            buf[0].zero_()

    def set_latent(self, layer_id: int, loc: torch.Tensor, latent: torch.Tensor) -> None:
        """Store ``latent`` ([T, latent_dim]) at slots ``loc`` ([T])."""
        self.latent_buffers[layer_id].index_copy_(0, loc, latent.to(self.dtype))

    def get_latent(self, layer_id: int) -> torch.Tensor:  # [num_slots, latent_dim]
        return self.latent_buffers[layer_id]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.latent_buffers)
