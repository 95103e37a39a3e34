"""OLMo 2 (``Olmo2ForCausalLM``): RMSNorms on the outputs of attention and of the MLP instead of before them, and
q/k RMSNorm over the whole projection."""

from __future__ import annotations

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.models.decoder_variants import VariantForCausalLM
from sgl_ray.models.llama_attention import DecoderFlags


class Olmo2ForCausalLM(VariantForCausalLM):
    checkpoint_renames = (
        (".post_attention_layernorm.", ".post_self_attn_layernorm."),
        (".post_feedforward_layernorm.", ".post_mlp_layernorm."),
    )

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        bias = bool(getattr(config.hf_config, "attention_bias", False))
        flags = DecoderFlags(qkv_bias=bias, o_bias=bias, qk_norm="full", norms="post")
        super().__init__(config, shard, flags)
