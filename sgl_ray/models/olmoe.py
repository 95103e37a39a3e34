"""OLMoE: q/k RMSNorm over the whole projection (not per head), optional q/k/v clipping, every layer sparse."""

from __future__ import annotations

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.layers.moe.layer import MoEConfig
from sgl_ray.layers.moe.router import RouterConfig
from sgl_ray.models.llama import DecoderFlags
from sgl_ray.models.moe import MoeForCausalLM, num_experts_of


class OlmoeForCausalLM(MoeForCausalLM):
    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        hf = config.hf_config
        bias = bool(getattr(hf, "attention_bias", False))
        flags = DecoderFlags(
            qkv_bias=bias, o_bias=bias, qk_norm="full", clip_qkv=getattr(hf, "clip_qkv", None)
        )
        super().__init__(config, shard, flags)

    def moe_config(self) -> MoEConfig:
        hf = self.config.hf_config
        router = RouterConfig(
            num_experts_of(hf), hf.num_experts_per_tok, renormalize=bool(getattr(hf, "norm_topk_prob", False))
        )
        return MoEConfig(router, hf.intermediate_size)
