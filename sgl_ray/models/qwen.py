"""Qwen2 (biased q/k/v projections) and Qwen3 (per-head q/k RMSNorm): Llama decoders with different flags."""

from __future__ import annotations

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.models.llama import DecoderFlags, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        super().__init__(config, shard, DecoderFlags(qkv_bias=True, o_bias=False))


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        bias = bool(getattr(config.hf_config, "attention_bias", False))
        super().__init__(config, shard, DecoderFlags(qkv_bias=bias, o_bias=bias, qk_norm="head"))
