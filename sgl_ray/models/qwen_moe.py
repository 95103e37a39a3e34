"""Qwen2-MoE (shared expert with a sigmoid gate, q/k/v biases) and Qwen3-MoE (per-head q/k norms).

Both mark a layer sparse when it is not in ``mlp_only_layers`` and ``(layer + 1) % decoder_sparse_step == 0``;
the others keep a dense MLP of ``intermediate_size``."""

from __future__ import annotations

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.layers.moe.layer import MoEConfig
from sgl_ray.layers.moe.router import RouterConfig
from sgl_ray.models.llama import DecoderFlags
from sgl_ray.models.moe import MoeForCausalLM, num_experts_of


class _QwenMoe(MoeForCausalLM):
    def _router(self) -> RouterConfig:
        hf = self.config.hf_config
        return RouterConfig(
            num_experts_of(hf), hf.num_experts_per_tok, renormalize=bool(getattr(hf, "norm_topk_prob", False))
        )


class Qwen2MoeForCausalLM(_QwenMoe):
    checkpoint_renames = ((".mlp.shared_expert.", ".mlp.shared_experts."),)

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        bias = bool(getattr(config.hf_config, "qkv_bias", True))
        super().__init__(config, shard, DecoderFlags(qkv_bias=bias))

    def moe_config(self) -> MoEConfig:
        hf = self.config.hf_config
        shared = int(getattr(hf, "shared_expert_intermediate_size", 0) or 0)
        return MoEConfig(
            self._router(),
            hf.moe_intermediate_size,
            shared_intermediate_size=shared,
            shared_expert_gate=shared > 0,
        )


class Qwen3MoeForCausalLM(_QwenMoe):
    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        bias = bool(getattr(config.hf_config, "attention_bias", False))
        super().__init__(config, shard, DecoderFlags(qkv_bias=bias, o_bias=bias, qk_norm="head"))

    def moe_config(self) -> MoEConfig:
        return MoEConfig(self._router(), self.config.hf_config.moe_intermediate_size)
