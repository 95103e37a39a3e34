"""The attention layer of a model: hands q/k/v to the batch's attention backend (RadixAttention).

Three per-layer options change what a query sees (every backend honours them or raises ``UnsupportedModelError``):

* ``sliding_window = W``: the query at position ``i`` attends to keys ``j`` with ``i - W < j <= i`` (W keys, itself
  included; transformers' ``sliding_window_overlay``). ``None``: every earlier key.
* ``sinks``: one learned logit per query head (GPT-OSS) that joins the softmax's denominator and nothing else:
  ``out_h = sum_j exp(s_hj) v_j / (sum_j exp(s_hj) + exp(sink_h))``. The sink is a raw logit, not scaled.
* ``logit_cap = c``: each scaled score ``s`` becomes ``c * tanh(s / c)`` before the mask and the softmax (Gemma 2's
  ``attn_logit_softcapping``; SGLang's ``logit_cap``). ``None``: scores as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sgl_ray.runner.forward_batch import ForwardBatch


class RadixAttention(nn.Module):
    """Paged attention over the KV pool for layer ``layer_id`` (head counts are per tensor-parallel rank).

    With ``sinks=True`` the layer owns ``sinks`` ([num_heads], this rank's heads ``tp_rank * num_heads ..``); its
    ``weight_loader`` takes the checkpoint's ``[total_heads]`` tensor and keeps this rank's slice."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scaling: float,
        num_kv_heads: int,
        layer_id: int,
        sliding_window: int | None = None,
        sinks: bool = False,
        tp_rank: int = 0,
        logit_cap: float | None = None,
    ) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1 (or None), got {sliding_window}")
        if logit_cap is not None and not logit_cap > 0:
            raise ValueError(f"logit_cap must be positive (or None), got {logit_cap}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id
        self.sliding_window = sliding_window
        self.logit_cap = None if logit_cap is None else float(logit_cap)
        self.tp_rank = tp_rank
        if sinks:
            self.sinks = nn.Parameter(torch.empty(num_heads), requires_grad=False)  # [num_heads]
            self.sinks.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("sinks", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Copy this rank's heads of the checkpoint's ``[total_heads]`` sinks into ``param``."""
        heads = param.shape[0]
        if loaded.dim() != 1 or loaded.shape[0] < (self.tp_rank + 1) * heads:
            raise ValueError(
                f"sinks: checkpoint tensor {tuple(loaded.shape)} does not hold heads "
                f"{self.tp_rank * heads}..{(self.tp_rank + 1) * heads} of rank {self.tp_rank}"
            )
        param.data.copy_(loaded.narrow(0, self.tp_rank * heads, heads))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, kv_stored: bool = False
    ) -> torch.Tensor:
        """``kv_stored``: the caller already wrote ``k``/``v`` to the pool at ``batch.out_cache_loc``."""
        return batch.attn_backend.forward(q, k, v, self, batch, kv_stored=kv_stored)
