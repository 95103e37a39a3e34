"""Phi-3 / Phi-4 (``Phi3ForCausalLM``): Llama's layer with q/k/v fused into one ``qkv_proj`` and gate/up into one
``gate_up_proj`` in the checkpoint (split at load, then sharded like Llama's), LongRoPE (``rope_type`` longrope:
short and long factors), partial rotary (Phi-4-mini: ``partial_rotary_factor``) and a sliding window where the
config sets one (``ModelConfig.sliding_window_of``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sgl_ray.models.llama import LlamaForCausalLM
from sgl_ray.models.loading import split_fused_projections


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        c = self.config
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        super().load_weights(split_fused_projections(weights, q_size, kv_size))
