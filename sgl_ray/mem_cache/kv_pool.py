"""KV tensors: one key and one value buffer per layer, indexed by token slot.

The slot layout (pages, which request owns which slot) is decided by the scheduler's allocator; this pool only
stores tensors. Slot 0 belongs to the reserved page and is a harmless target for padding writes.

An FP8 pool (``kv_cache_dtype="fp8_e4m3"`` or ``"fp8_e5m2"``) stores one byte per value with one scale per layer
for K and one for V (:class:`KVScale`): a write stores ``x / scale`` saturated to the format's finite range
(:func:`quantize_kv`), and a value read means ``stored * scale``. The attention backends apply the scales as they
read: the K scale multiplies the score scale and the V scale the output, so no dequantized copy is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class KVScale(NamedTuple):
    """One layer's K and V cache scales: a stored value ``s`` means ``s * k`` (keys) or ``s * v`` (values)."""

    k: float = 1.0
    v: float = 1.0


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` in float32, saturated to ``dtype``'s finite range (NaN stays NaN), as ``dtype``: what an
    FP8 pool stores for ``x``.

    >>> quantize_kv(torch.tensor([1.0, 1000.0, -0.3]), 2.0, torch.float8_e4m3fn).float().tolist()
    [0.5, 448.0, -0.15625]
    """
    y = x.to(torch.float32, copy=True)
    if scale != 1.0:
        y.div_(scale)
    limit = torch.finfo(dtype).max
    return y.clamp_(-limit, limit).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What stored values ``x`` mean, as ``dtype``: ``x * scale``."""
    out = x.to(dtype)
    return out * scale if scale != 1.0 else out


class KVPool:
    """``k_buffers[layer]`` and ``v_buffers[layer]`` are ``[num_slots, num_kv_heads, head_dim]`` of ``dtype``: the
    model's dtype, or an FP8 type with ``scales[layer]`` (default 1.0; a pool of another dtype has scales 1.0).
    Hybrid pools: ``[swa_num_slots, ...]`` for the layers with ``swa_layers[layer]``, indexed by SWA slot."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        scales: Sequence[KVScale] | None = None,
        swa_layers: Sequence[bool] | None = None,
        swa_num_slots: int = 0,
    ) -> None:
        self.num_slots = num_slots
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.is_fp8 = dtype in FP8_KV_DTYPES
        if scales is not None and len(scales) != num_layers:
            raise ValueError(f"KV scales for {len(scales)} layers, pool of {num_layers}")
        if scales is not None and not all(s > 0 for scale in scales for s in scale):
            raise ValueError(f"KV scales must be positive, got {list(scales)}")
        use_scales = self.is_fp8 and scales is not None
        self.scales: list[KVScale] = list(scales) if use_scales else [KVScale()] * num_layers
        # Hybrid pools: the windowed layers' buffers (``swa_layers[i]``) have their own slot space of
        # ``swa_num_slots`` slots, see mem_cache.hybrid_swa
        self.swa_layers = tuple(swa_layers) if swa_layers is not None else (False,) * num_layers
        if len(self.swa_layers) != num_layers:
            raise ValueError(f"SWA flags for {len(self.swa_layers)} layers, pool of {num_layers}")
        if any(self.swa_layers) and swa_num_slots < 1:
            raise ValueError("windowed layers in their own slot space need swa_num_slots")
        rows = [swa_num_slots if swa else num_slots for swa in self.swa_layers]
        # Uninitialised except the reserved slot 0: padded reads hit it and must stay finite (masked scores times
        # NaN would still be NaN); every other slot is written before it is read.
        self.k_buffers = [torch.empty((n, num_kv_heads, head_dim), dtype=dtype, device=device) for n in rows]
        self.v_buffers = [torch.empty((n, num_kv_heads, head_dim), dtype=dtype, device=device) for n in rows]
        for buf in self.k_buffers + self.v_buffers:
            buf[0].zero_()

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ([T, num_kv_heads, head_dim]) at slots ``loc`` ([T]); an FP8 pool stores them
        divided by the layer's scales (:func:`quantize_kv`)."""
        k_buf, v_buf = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if self.is_fp8:  # copied as bytes: index_copy_ has no FP8 kernel on every device
            scale = self.scales[layer_id]
            k = quantize_kv(k, scale.k, self.dtype).view(torch.uint8)
            v = quantize_kv(v, scale.v, self.dtype).view(torch.uint8)
            k_buf, v_buf = k_buf.view(torch.uint8), v_buf.view(torch.uint8)
        elif k.dtype != self.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        k_buf.index_copy_(0, loc, k)
        v_buf.index_copy_(0, loc, v)

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers as stored (FP8 ones mean ``stored * scales[layer_id]``)."""
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
