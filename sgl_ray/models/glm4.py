"""GLM-4 (``Glm4ForCausalLM``, the 0414 models): an RMSNorm on the output of attention and of the MLP besides the
ones before them, rotary on interleaved pairs over half of each head (``partial_rotary_factor``), biased q/k/v,
gate/up fused in the checkpoint."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.models.decoder_variants import VariantForCausalLM
from sgl_ray.models.llama_attention import DecoderFlags
from sgl_ray.models.loading import split_fused_projections


class Glm4ForCausalLM(VariantForCausalLM):
    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        bias = bool(getattr(config.hf_config, "attention_bias", True))
        flags = DecoderFlags(qkv_bias=bias, norms="sandwich", rotary_interleaved=True)
        super().__init__(config, shard, flags)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        c = self.config
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        super().load_weights(split_fused_projections(weights, q_size, kv_size))
