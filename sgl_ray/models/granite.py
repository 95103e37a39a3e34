"""Granite (``GraniteForCausalLM``): Llama's layer with four scales — the embeddings times
``embedding_multiplier`` (``ModelConfig.embedding_multiplier``), attention's softmax scale
``attention_multiplier``, each block's output times ``residual_multiplier`` before the residual add, the logits
divided by ``logits_scaling``."""

from __future__ import annotations

import torch

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.models.decoder_variants import VariantForCausalLM
from sgl_ray.models.llama_attention import DecoderFlags


class GraniteForCausalLM(VariantForCausalLM):
    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        hf = config.hf_config
        if getattr(hf, "mlp_bias", False):
            raise UnsupportedModelError("Granite with mlp_bias is not supported")
        bias = bool(getattr(hf, "attention_bias", False))
        flags = DecoderFlags(
            qkv_bias=bias,
            o_bias=bias,
            attn_scale=float(hf.attention_multiplier),
            residual_multiplier=float(hf.residual_multiplier),
        )
        super().__init__(config, shard, flags)
        self.logits_scaling = float(getattr(hf, "logits_scaling", 1.0) or 1.0)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        return super().compute_logits(hidden) / self.logits_scaling
