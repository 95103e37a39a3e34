"""The base of the MoE families: a Llama-shaped decoder whose MLPs are ``SparseMoeBlock`` s (all, or the layers
the family's config marks sparse), with the checkpoint renames that map a family's names onto the block's.

A family file says only what differs: its :class:`~sgl_ray.layers.moe.layer.MoEConfig`, its attention flags and
its renames."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import torch
from torch import nn

from sgl_ray.layers.moe.experts import FusedExperts, expert_weight_target
from sgl_ray.layers.moe.layer import MoEConfig, SparseMoeBlock
from sgl_ray.models.llama import LlamaForCausalLM, LlamaMLP


def num_experts_of(hf_config) -> int:
    """``num_experts`` (Qwen, OLMoE) or ``num_local_experts`` (Mixtral, GPT-OSS)."""
    return int(getattr(hf_config, "num_experts", None) or hf_config.num_local_experts)


class MoeForCausalLM(LlamaForCausalLM):
    """Subclasses set :attr:`checkpoint_renames` and implement :meth:`moe_config`; which layers are sparse comes
    from the config (:meth:`ModelConfig.is_sparse_layer`)."""

    checkpoint_renames: tuple[tuple[str, str], ...] = ()  # (checkpoint substring, ours), applied in order
    weight_remap = staticmethod(expert_weight_target)

    def moe_config(self) -> MoEConfig:
        raise NotImplementedError

    def make_mlp(self, layer: int) -> nn.Module:
        if self.config.is_sparse_layer(layer):
            return SparseMoeBlock(self.config.hidden_size, self.moe_config(), self.shard)
        return LlamaMLP(self.config, self.shard.tp)

    def moe_blocks(self) -> list[tuple[int, SparseMoeBlock]]:
        """``(global layer index, block)`` of this stage's sparse layers."""
        model = self.model
        return [
            (i, layer.mlp)
            for i, layer in enumerate(model.layers)
            if model.start <= i < model.end and isinstance(layer.mlp, SparseMoeBlock)
        ]

    def rename(self, name: str) -> str:
        for theirs, ours in self.checkpoint_renames:
            name = name.replace(theirs, ours)
        return name

    @cached_property
    def _experts_by_param(self) -> dict[str, FusedExperts]:
        return {
            f"{prefix}.{p}": module
            for prefix, module in self.named_modules()
            if isinstance(module, FusedExperts)
            for p in ("w13", "w2", "b13", "b2")
        }

    def wants_weight(self, name: str) -> bool:
        """False for a checkpoint tensor this shard never reads: another expert-parallel rank's expert, or an
        expert of a layer on another pipeline stage."""
        routed = expert_weight_target(self.rename(name))
        if routed is None:
            return True
        experts = self._experts_by_param.get(routed[0])
        return experts is not None and experts.wants(routed[1])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((self.rename(name), tensor) for name, tensor in weights)
        for prefix, module in self.named_modules():
            if isinstance(module, FusedExperts):
                module.check_loaded(prefix)

    @torch.no_grad()
    def expert_load(self, reset: bool = False) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert since the last reset, per sparse layer of this stage (int64 [E] on the
        host, global expert ids; prompt and generated tokens alike) — what this rank counted (see
        ``sgl_ray.layers.moe.dispatch``: empty on ranks that count nothing)."""
        out = {i: block.expert_counts.cpu() for i, block in self.moe_blocks() if block.counts_load}
        if reset:
            for _, block in self.moe_blocks():
                block.expert_counts.zero_()
        return out
