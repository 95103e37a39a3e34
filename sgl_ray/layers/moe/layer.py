"""The sparse MoE block models declare: router, routed experts, optional shared experts, one all-reduce.

::

    x [T, H] (the same on every rank of the tensor-parallel group)
      ├─ gate ─▶ logits [T, E] ─ select_experts ─▶ TopK (global ids)
      ├─ this rank's experts (backend.run_experts)  ─┐  partial sums: this rank's experts and intermediate slices
      └─ shared experts (column/row-parallel slice) ─┴─▶ + ─ all-reduce over the group ─▶ [T, H]

That is the default dispatch (``moe_a2a_backend="none"``): every rank already holds every token after
tensor-parallel attention, so the dispatch is a selection on each rank and the combine is the same single
all-reduce a dense MLP ends with. :mod:`sgl_ray.layers.moe.dispatch` has the all-to-all alternative;
:class:`~sgl_ray.layers.moe.experts.ExpertPlacement` says which experts a rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from sgl_ray.distributed import ShardContext
from sgl_ray.layers.activation import SiluAndMul
from sgl_ray.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear, linear
from sgl_ray.layers.moe.base import Activation, TopK, count_experts
from sgl_ray.layers.moe.dispatch import DISPATCHES
from sgl_ray.layers.moe.experts import ExpertPlacement, FusedExperts
from sgl_ray.layers.moe.router import RouterConfig, select_experts

if TYPE_CHECKING:
    from sgl_ray.layers.norm import RMSNorm
    from sgl_ray.runner.forward_batch import ForwardBatch


def triton_router():
    """:mod:`sgl_ray.layers.moe.triton_router`, imported on first use (CPU installs may lack Triton)."""
    from sgl_ray.layers.moe import triton_router as module

    return module


@dataclass(frozen=True)
class MoEConfig:
    """One family's MoE block, read from its HF config by the model file.

    Example (Mixtral-8x7B)::

        >>> cfg = MoEConfig(RouterConfig(num_experts=8, top_k=2), intermediate_size=14336)
        >>> cfg.router.num_experts, cfg.shared_intermediate_size
        (8, 0)
    """

    router: RouterConfig
    intermediate_size: int  # of one routed expert
    activation: Activation = field(default_factory=Activation)
    expert_bias: bool = False  # GPT-OSS
    router_bias: bool = False  # GPT-OSS
    shared_intermediate_size: int = 0  # 0: no shared experts
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared output scaled by sigmoid(w . x)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts


class MoEGate(nn.Module):
    """The router's linear layer (replicated), with GPT-OSS's bias and DeepSeek-V3's correction bias."""

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        e = config.num_experts
        self.weight = nn.Parameter(torch.empty(e, hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(e), requires_grad=False) if config.router_bias else None
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(e), requires_grad=False) if config.router.correction_bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, E]
        return linear(x, self.weight, self.bias)


class SharedExperts(nn.Module):
    """A gated SiLU MLP over every token, sharded like a dense MLP (``shard``) or whole (``shard`` None);
    returns this rank's partial sum (the whole output when not sharded)."""

    def __init__(self, hidden_size: int, intermediate_size: int, shard: ShardContext | None) -> None:
        super().__init__()
        tp = shard.tp if shard is not None else None
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], False, tp
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp, reduce_results=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """Example::

    >>> block = SparseMoeBlock(hidden_size=64, config=cfg, shard=ShardContext())  # doctest: +SKIP
    >>> out = block(x, batch)  # doctest: +SKIP  # [T, 64]
    """

    def __init__(self, hidden_size: int, config: MoEConfig, shard: ShardContext) -> None:
        super().__init__()
        self.config = config
        self.tp = shard.tp
        self.dispatch = DISPATCHES[shard.moe_a2a_backend]()
        self.counts_load = self.dispatch.counts_on(shard.tp.rank)
        placement = ExpertPlacement.of(config.num_experts, shard.tp.rank, shard.tp.world_size, shard.ep_size)
        self.gate = MoEGate(hidden_size, config)
        self.experts = FusedExperts(
            hidden_size, config.intermediate_size, placement, config.activation, config.expert_bias
        )
        self.shared_experts = None
        if config.shared_intermediate_size:
            sharding = None if self.dispatch.replicated_shared_experts else shard
            self.shared_experts = SharedExperts(hidden_size, config.shared_intermediate_size, sharding)
        self.shared_expert_gate = (
            ReplicatedLinear(hidden_size, 1, False, None) if config.shared_expert_gate else None
        )
        # tokens routed to each expert since the last reset (global ids; graph padding rows not counted; under
        # ``none`` only the group's first rank counts, see sgl_ray.layers.moe.dispatch)
        self.register_buffer(
            "expert_counts", torch.zeros(config.num_experts, dtype=torch.int64), persistent=False
        )
        # for the one-row step whose router GEMV also routes (triton_router.gate_topk_router)
        self.register_buffer("router_counter", torch.zeros(1, dtype=torch.int32), persistent=False)

    def route(
        self, x: torch.Tensor, counts: torch.Tensor | None = None, count_rows: torch.Tensor | None = None
    ) -> TopK:
        """The experts of each token of ``x``; with ``counts``, the chosen experts of rows whose ``count_rows``
        entry is nonzero (every row when None) are counted too. One kernel on CUDA
        (:mod:`sgl_ray.layers.moe.triton_router`)."""
        return self._select(self.gate(x), counts, count_rows)

    def _select(
        self, logits: torch.Tensor, counts: torch.Tensor | None, count_rows: torch.Tensor | None
    ) -> TopK:
        config, bias = self.config.router, self.gate.e_score_correction_bias
        if logits.is_cuda and triton_router().supports(config):
            return triton_router().topk_router(logits, config, bias, counts, count_rows)
        topk = select_experts(logits, config, bias)
        if counts is not None:
            count_experts(counts, topk.ids, None if count_rows is None else count_rows != 0)
        return topk

    def run_experts(self, x: torch.Tensor, topk: TopK, batch: ForwardBatch) -> torch.Tensor:
        """This rank's experts over ``x`` (pairs of other ranks' experts skipped): partial sums [T, H]."""
        backend = batch.moe_backend
        assert backend is not None, "the runner sets ForwardBatch.moe_backend for models with MoE layers"
        return backend.run_experts(x, self.experts.weights(), topk, self.experts.placement.first_expert)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        assert self.shared_experts is not None
        out = self.shared_experts(x)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.dispatch.run(self, x, batch)

    def forward_normed(
        self, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(norm(hidden + residual)), hidden + residual)``: the decoder layer's second half."""
        x, residual = norm(hidden, residual)
        return self(x, batch), residual

    def fold_input_norm(self, g: torch.Tensor) -> bool:
        """Nothing is folded: the norm before the block keeps its scale ``g``, which the one-row kernels apply to
        their input as they read it (:meth:`forward_folded`). Folded into the router's weights, ``W diag(g)``
        rounded to bf16 would move the routing logits of every step, prefill included, and flip close choices.
        Returns False (the norm's weight stays)."""
        return False

    def runs_folded(self, x: torch.Tensor, batch: ForwardBatch) -> bool:
        """Whether :meth:`forward_folded` takes a step whose rows are like ``x``: one CUDA row on one rank, no
        shared experts, and a backend with the residual expert step."""
        backend = batch.moe_backend
        return (
            x.is_cuda
            and self.tp.world_size == 1
            and self.shared_experts is None
            and backend is not None
            and backend.runs_residual(x, self.experts.weights(), self.config.router.top_k)
            and self.gate.weight.dtype == x.dtype
        )

    def forward_folded(
        self, h: torch.Tensor, norm: object, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the residual stream ``h``, its RMSNorm inside the router's GEMV and the experts' first GEMV
        (``norm``: a ``triton_gemv_epilogues.NormOfInput`` with the norm's scale, see :meth:`fold_input_norm`):
        returns ``(h + block(rmsnorm(h)), sumsq)`` for the next layer (see ``LlamaDecoderLayer.forward_folded``).
        Only where :meth:`runs_folded`."""
        from sgl_ray.layers.cuda_ops import cuda_ops

        counts = self.expert_counts if self.counts_load else None
        rows = batch.out_cache_loc  # padding rows write slot 0: not counted
        config, gate = self.config.router, self.gate
        if triton_router().supports(config):  # the router's GEMV and the choice in one launch
            topk = triton_router().gate_topk_router(
                h, gate.weight, gate.bias, config, self.router_counter, norm, gate.e_score_correction_bias,
                counts, rows,
            )  # fmt: skip
        else:  # grouped top-k: the router's GEMV on the normed row, the choice on the torch path
            x = cuda_ops().rmsnorm(h, norm.weight, norm.eps)
            topk = self._select(cuda_ops().gemv(x, gate.weight, gate.bias), counts, rows)
        backend = batch.moe_backend
        assert backend is not None
        return backend.run_experts_residual(
            h, norm, self.experts.weights(), topk, self.experts.placement.first_expert
        )
