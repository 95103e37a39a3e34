"""The routed experts of one MoE layer on one rank, with the loaders that cut checkpoint tensors for it.

Placement follows SGLang: the tensor-parallel group of ``tp_size`` ranks is split into ``ep_size`` expert groups of
``moe_tp_size = tp_size // ep_size`` ranks. Rank r holds experts ``[ep_rank * E / ep, (ep_rank + 1) * E / ep)``
(``ep_rank = r // moe_tp_size``), each with its intermediate dimension split over the ``moe_tp_size`` ranks of
its group (slice ``moe_tp_rank = r % moe_tp_size``). Every rank's output is a partial sum over its experts and
slices, so the layer's one all-reduce over the group completes it (a down-projection bias is added by the first
slice of its expert only).

Checkpoint layouts:

* per expert (Mixtral ``experts.{e}.w1|w3|w2``, Qwen/OLMoE/DeepSeek ``experts.{e}.gate_proj|up_proj|down_proj``):
  ``[I, H]`` gate and up, ``[H, I]`` down;
* fused (GPT-OSS): ``experts.gate_up_proj`` [E, H, 2I] with gate and up interleaved along the last dimension,
  ``experts.gate_up_proj_bias`` [E, 2I] (interleaved), ``experts.down_proj`` [E, I, H], ``experts.down_proj_bias``
  [E, H].
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from sgl_ray.errors import ModelLoadError
from sgl_ray.layers.moe.base import Activation, ExpertWeights

_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias)$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_FUSED_TARGET = {"gate_up_proj": "w13", "gate_up_proj_bias": "b13", "down_proj": "w2", "down_proj_bias": "b2"}


def expert_weight_target(name: str) -> tuple[str, object] | None:
    """The parameter a checkpoint tensor of routed experts loads into, and its ``shard_id``, or None.

    Example::

        >>> expert_weight_target("model.layers.0.block_sparse_moe.experts.3.w1.weight")
        ('model.layers.0.block_sparse_moe.experts.w13', (3, 'gate'))
        >>> expert_weight_target("model.layers.1.mlp.experts.down_proj")
        ('model.layers.1.mlp.experts.w2', (None, 'fused'))
    """
    if m := _PER_EXPERT.match(name):
        part = _PART[m.group(3)]
        return f"{m.group(1)}.{'w2' if part == 'down' else 'w13'}", (int(m.group(2)), part)
    if m := _FUSED.match(name):
        return f"{m.group(1)}.{_FUSED_TARGET[m.group(2)]}", (None, "fused")
    return None


@dataclass(frozen=True)
class ExpertPlacement:
    """Which experts and which intermediate slice one rank holds.

    Example::

        >>> p = ExpertPlacement.of(num_experts=8, tp_rank=3, tp_size=4, ep_size=2)
        >>> (p.first_expert, p.num_local_experts, p.moe_tp_rank, p.moe_tp_size)
        (4, 4, 1, 2)
    """

    num_experts: int
    ep_rank: int = 0
    ep_size: int = 1
    moe_tp_rank: int = 0
    moe_tp_size: int = 1

    @classmethod
    def of(cls, num_experts: int, tp_rank: int, tp_size: int, ep_size: int) -> ExpertPlacement:
        if tp_size % ep_size:
            raise ValueError(f"ep_size ({ep_size}) must divide tp_size ({tp_size})")
        if num_experts % ep_size:
            raise ValueError(f"ep_size ({ep_size}) must divide the number of experts ({num_experts})")
        moe_tp = tp_size // ep_size
        return cls(num_experts, tp_rank // moe_tp, ep_size, tp_rank % moe_tp, moe_tp)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.num_local_experts

    def holds(self, expert: int) -> bool:
        return self.first_expert <= expert < self.first_expert + self.num_local_experts


class FusedExperts(nn.Module):
    """``w13`` [E_local, 2 * I_local, H], ``w2`` [E_local, H, I_local] (+ optional biases) of this rank."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        placement: ExpertPlacement,
        activation: Activation = Activation(),
        bias: bool = False,
    ) -> None:
        super().__init__()
        if intermediate_size % placement.moe_tp_size:
            raise ValueError(
                f"the experts' intermediate size ({intermediate_size}) is not divisible by the tensor-parallel "
                f"size within an expert group ({placement.moe_tp_size}); use a larger ep_size"
            )
        self.placement = placement
        self.activation = activation
        self.inter = intermediate_size // placement.moe_tp_size
        e, i, h = placement.num_local_experts, self.inter, hidden_size
        self.w13 = self._param(e, 2 * i, h)
        self.w2 = self._param(e, h, i)
        self.b13 = self._param(e, 2 * i) if bias else None
        self.b2 = self._param(e, h) if bias else None
        # which (local expert, part) pairs a checkpoint has filled, checked by check_loaded()
        self._loaded: set[tuple[str, int | None, str]] = set()

    def _param(self, *shape: int) -> nn.Parameter:
        p = nn.Parameter(torch.empty(*shape), requires_grad=False)
        p.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        return p

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.b13, self.b2, self.activation)

    def wants(self, shard_id: object) -> bool:
        """Whether a checkpoint tensor with this ``shard_id`` (see :func:`expert_weight_target`) is read at all:
        an expert-parallel rank skips other ranks' experts without reading them."""
        expert = shard_id[0] if isinstance(shard_id, tuple) else None
        return expert is None or self.placement.holds(expert)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        expert, part = shard_id  # type: ignore[misc]
        which = self._which(param)
        if part == "fused":
            self._load_fused(which, loaded)
            self._loaded.add((which, None, "fused"))
            return
        if not self.placement.holds(expert):
            return
        local = expert - self.placement.first_expert
        i, r = self.inter, self.placement.moe_tp_rank
        if part == "down":  # [H, I] -> this slice's columns
            _copy(param.data[local], loaded.narrow(1, r * i, i))
        else:  # [I, H] gate or up -> rows [0, I) or [I, 2I) of w13
            offset = 0 if part == "gate" else i
            _copy(param.data[local].narrow(0, offset, i), loaded.narrow(0, r * i, i))
        self._loaded.add((which, local, part))

    def _which(self, param: nn.Parameter) -> str:
        for name in ("w13", "w2", "b13", "b2"):
            if getattr(self, name) is param:
                return name
        raise AssertionError("not a parameter of this module")

    def _load_fused(self, which: str, loaded: torch.Tensor) -> None:
        """GPT-OSS's fused tensors (all experts, input-major, gate/up interleaved)."""
        p = self.placement
        experts = loaded.narrow(0, p.first_expert, p.num_local_experts)
        i, r = self.inter, p.moe_tp_rank
        if which in ("w13", "b13"):
            gate, up = experts[..., 0::2], experts[..., 1::2]  # [E, (H,) I_full]
            gate, up = gate.narrow(-1, r * i, i), up.narrow(-1, r * i, i)
            both = torch.cat([gate, up], dim=-1)  # [E, (H,) 2I]
            _copy(getattr(self, which).data, both.transpose(1, 2) if which == "w13" else both)
        elif which == "w2":  # [E, I_full, H] -> [E, H, I]
            _copy(self.w2.data, experts.narrow(1, r * i, i).transpose(1, 2))
        else:  # b2 [E, H]: added once, by the first slice
            assert self.b2 is not None
            _copy(self.b2.data, experts if r == 0 else torch.zeros_like(experts))

    def check_loaded(self, prefix: str) -> None:
        """Raise :class:`ModelLoadError` naming the first local expert weights the checkpoint did not hold."""
        names = [n for n in ("w13", "w2", "b13", "b2") if getattr(self, n) is not None]
        missing = []
        for name in names:
            if (name, None, "fused") in self._loaded:
                continue
            parts = ("gate", "up") if name == "w13" else ("down",) if name == "w2" else ()
            if not parts:
                missing.append(f"{prefix}.{name}")
                continue
            for e in range(self.placement.num_local_experts):
                for part in parts:
                    if (name, e, part) not in self._loaded:
                        missing.append(f"{prefix}.{self.placement.first_expert + e}.{part}")
        if missing:
            raise ModelLoadError(f"checkpoint is missing expert weights: {missing[:8]}")
        self._loaded.clear()


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ModelLoadError(
            f"expert weight shape mismatch: parameter {tuple(dst.shape)} vs checkpoint {tuple(src.shape)}"
        )
    dst.copy_(src)
