"""Mixtral: every layer sparse, softmax router with the top-k renormalized, experts ``w1`` (gate), ``w3`` (up),
``w2`` (down) under ``block_sparse_moe``."""

from __future__ import annotations

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.layers.moe.layer import MoEConfig
from sgl_ray.layers.moe.router import RouterConfig
from sgl_ray.models.llama import DecoderFlags
from sgl_ray.models.moe import MoeForCausalLM, num_experts_of


class MixtralForCausalLM(MoeForCausalLM):
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        super().__init__(config, shard, DecoderFlags.for_llama(config))

    def moe_config(self) -> MoEConfig:
        hf = self.config.hf_config
        router = RouterConfig(num_experts_of(hf), hf.num_experts_per_tok, renormalize=True)
        return MoEConfig(router, hf.intermediate_size)
