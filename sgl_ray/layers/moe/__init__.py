"""Mixture-of-experts layers: the router, the experts of one rank and their kernels (torch on CPU, Triton on CUDA),
expert placement for expert parallelism, the token dispatch between shards, and the block models declare.

>>> from sgl_ray.layers.moe import MoEConfig, RouterConfig
>>> MoEConfig(RouterConfig(num_experts=8, top_k=2), intermediate_size=14336).num_experts
8
"""

from sgl_ray.layers.moe.base import Activation, ExpertWeights, MoEBackend, TopK, create_moe_backend
from sgl_ray.layers.moe.experts import ExpertPlacement, FusedExperts, expert_weight_target
from sgl_ray.layers.moe.layer import MoEConfig, SparseMoeBlock
from sgl_ray.layers.moe.router import RouterConfig, select_experts

__all__ = [
    "Activation",
    "ExpertPlacement",
    "ExpertWeights",
    "FusedExperts",
    "MoEBackend",
    "MoEConfig",
    "RouterConfig",
    "SparseMoeBlock",
    "TopK",
    "create_moe_backend",
    "expert_weight_target",
    "select_experts",
]
