"""The attention layer of a model: hands q/k/v to the batch's attention backend (RadixAttention)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sgl_ray.runner.forward_batch import ForwardBatch


class RadixAttention(nn.Module):
    """Paged attention over the KV pool for layer ``layer_id`` (head counts are per tensor-parallel rank)."""

    def __init__(
        self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int, layer_id: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, kv_stored: bool = False
    ) -> torch.Tensor:
        """``kv_stored``: the caller already wrote ``k``/``v`` to the pool at ``batch.out_cache_loc``."""
        return batch.attn_backend.forward(q, k, v, self, batch, kv_stored=kv_stored)
