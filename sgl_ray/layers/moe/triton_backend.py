"""Experts as Triton kernels (CUDA; also Triton's CPU interpreter in tests), safe to capture in CUDA graphs.

Two paths, chosen per layer shape and batch size by :func:`sgl_ray.layers.moe.triton_configs.launch_config`:

* small batch (decode): :mod:`sgl_ray.layers.moe.triton_small_batch`, two GEMV-style launches that read each
  active expert's weights once and combine in the second one;
* grouped GEMM: :mod:`sgl_ray.layers.moe.triton_align` sorts the pairs by expert into blocks of ``block_m`` rows
  (two launches), then :mod:`sgl_ray.layers.moe.triton_kernels` runs gate/up + activation, down + routing weight,
  and the combine (three launches, or four with fp32 atomics).

Nothing reads device values on the host: buffer sizes and grids follow from ``T``, ``k``, ``E`` and the block
size, and programs past the rows in use return at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sgl_ray.layers.moe.base import ExpertWeights, MoEBackend, TopK
from sgl_ray.layers.moe.triton_align import sort_pairs
from sgl_ray.layers.moe.triton_configs import LaunchConfig, launch_config
from sgl_ray.layers.moe.triton_kernels import down_combine, gate_up
from sgl_ray.layers.moe.triton_small_batch import small_batch_experts


class TritonMoEBackend(MoEBackend):
    """Example (on a CUDA device)::

    >>> backend = TritonMoEBackend()  # doctest: +SKIP
    >>> out = backend.run_experts(x, weights, topk)  # doctest: +SKIP
    """

    supports_cuda_graph = True

    def __init__(
        self,
        config: LaunchConfig | None = None,  # a fixed launch configuration (tests, tuning); None: the table's
        empty: Callable[..., torch.Tensor] = torch.empty,  # allocates every buffer (tests poison them)
    ) -> None:
        self._config = config
        self._empty = empty

    def config_for(self, x: torch.Tensor, weights: ExpertWeights, top_k: int) -> LaunchConfig:
        if self._config is not None:
            return self._config
        num_local, hidden, inter = weights.w2.shape
        return launch_config(num_local, hidden, inter, x.dtype, x.shape[0], top_k)

    def run_experts(
        self,
        x: torch.Tensor,
        weights: ExpertWeights,
        topk: TopK,
        first_expert: int = 0,
        counts: torch.Tensor | None = None,
        count_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check(x, weights, topk, counts, count_mask)
        tokens, top_k = topk.ids.shape
        if tokens == 0:
            return x.new_empty((0, x.shape[1]))
        ids = topk.ids.to(torch.int32).contiguous()  # [T, k]
        route_weights = topk.weights.to(torch.float32).contiguous()  # [T, k]
        mask = count_mask.contiguous() if count_mask is not None and counts is not None else None
        config = self.config_for(x, weights, top_k)
        if config.small_batch:
            return small_batch_experts(
                x, weights, route_weights, ids, first_expert, config.gemv1, config.gemv2, counts, mask,
                self._empty,
            )  # fmt: skip
        num_local = weights.w13.shape[0]
        pairs = sort_pairs(ids, first_expert, num_local, config.block_m, counts, mask, self._empty)
        h = gate_up(x, weights, pairs, top_k, config.block_m, config.gemm1, self._empty)
        return down_combine(
            h, weights, route_weights, ids, pairs, first_expert, config.block_m, config.gemm2,
            config.atomic_combine, self._empty,
        )  # fmt: skip

    def runs_residual(self, x: torch.Tensor, weights: ExpertWeights, top_k: int) -> bool:
        return x.shape[0] == 1 and self.config_for(x, weights, top_k).small_batch

    def run_experts_residual(
        self, h: torch.Tensor, norm: object, weights: ExpertWeights, topk: TopK, first_expert: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(h, weights, topk, None, None)
        config = self.config_for(h, weights, topk.ids.shape[1])
        if not config.small_batch:
            raise ValueError(f"the residual expert step runs on the small-batch path ({h.shape[0]} rows)")
        ids = topk.ids.to(torch.int32).contiguous()
        route_weights = topk.weights.to(torch.float32).contiguous()
        return small_batch_experts(
            h, weights, route_weights, ids, first_expert, config.gemv1, config.gemv2, None, None, self._empty,
            norm=norm, add_residual=True,
        )  # fmt: skip


def _check(
    x: torch.Tensor,
    weights: ExpertWeights,
    topk: TopK,
    counts: torch.Tensor | None,
    count_mask: torch.Tensor | None,
) -> None:
    """Shape, dtype and layout checks (host metadata only)."""
    w13, w2 = weights.w13, weights.w2
    num_local, hidden, inter = w2.shape
    if x.dim() != 2 or x.shape[1] != hidden or x.stride(1) != 1:
        raise ValueError(f"x must be [T, {hidden}] with unit stride along H, got {tuple(x.shape)}")
    if w13.shape != (num_local, 2 * inter, hidden) or not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError(
            f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} must be contiguous [E, 2I, H], [E, H, I]"
        )
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"expert weights in {w13.dtype}/{w2.dtype} for activations in {x.dtype}")
    for name, bias, width in (("b13", weights.b13, 2 * inter), ("b2", weights.b2, hidden)):
        if bias is not None and (bias.shape != (num_local, width) or bias.stride(1) != 1):
            raise ValueError(
                f"{name} must be [{num_local}, {width}] with unit stride, got {tuple(bias.shape)}"
            )
    if topk.ids.shape != topk.weights.shape or topk.ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk ids {tuple(topk.ids.shape)} / weights {tuple(topk.weights.shape)} for {x.shape[0]} tokens"
        )
    if counts is not None and (
        counts.dtype != torch.int64 or counts.dim() != 1 or not counts.is_contiguous()
    ):
        raise ValueError("counts must be a contiguous int64 [num_global_experts] tensor")
    if count_mask is not None and count_mask.shape != (x.shape[0],):
        raise ValueError(f"count_mask must be [{x.shape[0]}], got {tuple(count_mask.shape)}")
