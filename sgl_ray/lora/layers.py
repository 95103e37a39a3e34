"""LoRA wrappers around the tensor-parallel linear layers; model files stay unchanged.

A wrapper keeps the base layer (``base``) and adds the batch's LoRA deltas (see :mod:`sgl_ray.lora.backend`).
Sharding follows the base layer, through its own weight loader:

* column-parallel (QKV, gate/up): A is replicated, B is cut by output rows exactly like the weight;
* row-parallel (o, down): A is cut by input columns like the weight, B is replicated; each rank adds its partial
  delta before the all-reduce, which sums them (the delta is linear in the partial shrink).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sgl_ray.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    linear,
)
from sgl_ray.lora.backend import LoRABackend, LoRABatch


class LoRAContext:
    """Per-runner state every wrapper reads: the backend and the current batch's segments (None: no adapter)."""

    def __init__(self, backend: LoRABackend) -> None:
        self.backend = backend
        self.batch: LoRABatch | None = None


class _LoRALinear(nn.Module):
    """``sections``: checkpoint module name → the base layer's ``shard_id`` for it (one section per fused part)."""

    def __init__(
        self, base: nn.Module, sections: dict[str, Any], ctx: LoRAContext, num_slots: int, max_rank: int
    ) -> None:
        super().__init__()
        self.base = base
        self.sections = sections
        self.ctx = ctx
        self.max_rank = max_rank
        n = len(sections) * max_rank
        w = base.weight
        # [S, N, K_local], [S, O_local, N]
        self.register_buffer("lora_a", torch.zeros(num_slots, n, w.shape[1], dtype=w.dtype, device=w.device))
        self.register_buffer("lora_b", torch.zeros(num_slots, w.shape[0], n, dtype=w.dtype, device=w.device))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def load_slot(self, slot: int, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Put one checkpoint module's full ``A [r, in]`` and scaled ``B [out, r]`` into ``slot``."""
        i = list(self.sections).index(module)
        r, rows = a.shape[0], slice(i * self.max_rank, i * self.max_rank + a.shape[0])
        self._load_a(slot, rows, a.to(self.lora_a.dtype))
        # B's columns for this section (others zero: block-diagonal); rows cut by the base layer's loader
        full_b = torch.zeros(b.shape[0], self.lora_b.shape[2], dtype=self.lora_b.dtype)
        full_b[:, rows] = b.to(self.lora_b.dtype)
        self._load_b(slot, self.sections[module], full_b, r)

    def _load_a(self, slot: int, rows: slice, a: torch.Tensor) -> None:
        self.lora_a[slot, rows].copy_(a)

    def _load_b(self, slot: int, shard_id: Any, full_b: torch.Tensor, r: int) -> None:
        self.base.weight_loader(self.lora_b[slot], full_b.to(self.lora_b.device), shard_id)

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.ctx.batch is not None:
            self.ctx.backend.apply(x, out, self.lora_a, self.lora_b, self.ctx.batch)


class ColumnLoRALinear(_LoRALinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [T, O_local]
        self._add_lora(x, out)
        return out


class RowLoRALinear(_LoRALinear):
    def _load_a(self, slot: int, rows: slice, a: torch.Tensor) -> None:
        full = torch.zeros(self.lora_a.shape[1], a.shape[1], dtype=a.dtype)
        full[rows] = a
        self.base.weight_loader(self.lora_a[slot], full.to(self.lora_a.device))  # cut by input columns

    def _load_b(self, slot: int, shard_id: Any, full_b: torch.Tensor, r: int) -> None:
        self.lora_b[slot].copy_(full_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        # [T, O] partial sum over this rank's input slice; a single CUDA row goes to the batch-1 GEMV
        out = linear(x, base.weight)
        self._add_lora(x, out)
        if base.tp.world_size > 1 and base.reduce_results:
            out = base.tp.all_reduce(out)
        if base.bias is not None:
            out = out + base.bias
        return out


def _sections(layer: nn.Module, attr: str) -> dict[str, Any] | None:
    if isinstance(layer, QKVParallelLinear):
        return {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
    if isinstance(layer, MergedColumnParallelLinear) and attr == "gate_up_proj":
        return {"gate_proj": 0, "up_proj": 1}
    if isinstance(layer, (RowParallelLinear, ColumnParallelLinear)) and attr in ("o_proj", "down_proj"):
        return {attr: None}
    return None


def wrap_model(
    model: nn.Module, ctx: LoRAContext, num_slots: int, max_rank: int
) -> dict[int, dict[str, _LoRALinear]]:
    """Replace the q/k/v/o/gate/up/down projections of every local decoder layer with LoRA wrappers.
    Returns ``{layer index: {checkpoint module name: wrapper}}``."""
    wrapped: dict[int, dict[str, _LoRALinear]] = {}
    decoder = model.model
    for layer_id in range(decoder.start, decoder.end):
        layer = decoder.layers[layer_id]
        for parent in (layer.self_attn, layer.mlp):
            for attr, child in list(parent.named_children()):
                sections = _sections(child, attr)
                if sections is None:
                    continue
                cls = RowLoRALinear if isinstance(child, RowParallelLinear) else ColumnLoRALinear
                wrapper = cls(child, sections, ctx, num_slots, max_rank)
                setattr(parent, attr, wrapper)
                for name in sections:
                    wrapped.setdefault(layer_id, {})[name] = wrapper
    return wrapped
