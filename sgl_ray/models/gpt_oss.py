"""GPT-OSS: attention sinks, sliding-window attention on alternate layers (``layer_types``), YaRN rotary, biased
projections; experts with biases and the clamped ``swigluoai`` activation, fused in the checkpoint
(``experts.gate_up_proj`` [E, H, 2I], gate and up interleaved); a biased router whose top-k logits take the
softmax. bf16 weights (MXFP4 checkpoints need the quantization support)."""

from __future__ import annotations

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.moe.base import Activation
from sgl_ray.layers.moe.layer import MoEConfig
from sgl_ray.layers.moe.router import RouterConfig
from sgl_ray.models.llama import DecoderFlags
from sgl_ray.models.moe import MoeForCausalLM, num_experts_of


class GptOssForCausalLM(MoeForCausalLM):
    checkpoint_renames = ((".mlp.router.", ".mlp.gate."), (".self_attn.sinks", ".self_attn.attn.sinks"))

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        quant = getattr(config.hf_config, "quantization_config", None)
        if quant:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise UnsupportedModelError(
                f"GPT-OSS with quantization {method!r} is not supported (bf16 checkpoints only)"
            )
        bias = bool(getattr(config.hf_config, "attention_bias", True))
        super().__init__(config, shard, DecoderFlags(qkv_bias=bias, o_bias=bias, sinks=True))

    def moe_config(self) -> MoEConfig:
        hf = self.config.hf_config
        router = RouterConfig(num_experts_of(hf), hf.num_experts_per_tok, softmax_after_topk=True)
        # configs of older transformers carry only the limit (the alpha was a constant of the model code)
        alpha, limit = getattr(hf, "swiglu_alpha", 1.702), getattr(hf, "swiglu_limit", 7.0)
        activation = Activation("swigluoai", float(alpha), float(limit))
        return MoEConfig(
            router, hf.intermediate_size, activation=activation, expert_bias=True, router_bias=True
        )
