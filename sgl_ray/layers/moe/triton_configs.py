"""Launch configurations of the Triton MoE kernels, per layer shape and batch size.

Two paths (see :mod:`sgl_ray.layers.moe.triton_backend`):

* **small batch** (decode): no sorting; GEMV-style programs, one per (pair, rows of the output), launched on
  ``gemv1`` (gate/up) and ``gemv2`` (down + combine);
* **grouped GEMM**: pairs sorted by expert and padded to ``block_m`` rows, then ``gemm1`` and ``gemm2`` tiles, the
  combine either a reduction kernel over the k pairs of each token or fp32 atomics (``atomic_combine``).

``TABLE`` maps ``(local experts, hidden, intermediate, dtype name)`` to buckets ``(max tokens, config)`` in
increasing order: a batch of T tokens takes the first bucket with ``T <= max tokens`` (the last one beyond).
Shapes not in the table get :func:`default_config`. Rows come from ``python -m sgl_ray.bench.moe_kernels --tune``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class GemvConfig(NamedTuple):
    block_n: int  # output rows per program
    block_k: int  # input columns per loop step (gemv2 with block_k >= I: a pair's whole rows in one tile)
    num_warps: int
    num_stages: int  # passed to Triton, which does not software-pipeline these loops (3.6, 3.9): no effect
    pairs: int = 1  # gemv2: pairs of a token whose weight tiles are loaded together (bytes in flight)


class GemmConfig(NamedTuple):
    block_n: int
    block_k: int
    group_m: int  # row blocks that share a column band of the weights before the next band (L2 reuse)
    num_warps: int
    num_stages: int


class LaunchConfig(NamedTuple):
    small_batch: bool
    gemv1: GemvConfig
    gemv2: GemvConfig
    block_m: int  # rows per expert block of the grouped path (each expert's pairs padded to a multiple)
    gemm1: GemmConfig
    gemm2: GemmConfig
    atomic_combine: bool  # fp32 atomics into [T, H] instead of [T*k, H] rows and a reduction


_GEMV1 = GemvConfig(block_n=2, block_k=512, num_warps=1, num_stages=4)
_GEMV2 = GemvConfig(block_n=4, block_k=256, num_warps=2, num_stages=4, pairs=4)
_GEMM = GemmConfig(block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3)


def small(gemv1: GemvConfig = _GEMV1, gemv2: GemvConfig = _GEMV2) -> LaunchConfig:
    """A small-batch configuration (the grouped fields unused)."""
    return LaunchConfig(True, gemv1, gemv2, 16, _GEMM, _GEMM, False)


def grouped(block_m: int, gemm1: GemmConfig, gemm2: GemmConfig, atomic_combine: bool = False) -> LaunchConfig:
    """A grouped-GEMM configuration (the GEMV fields unused)."""
    return LaunchConfig(False, _GEMV1, _GEMV2, block_m, gemm1, gemm2, atomic_combine)


def config_source(config: LaunchConfig) -> str:
    """The Python expression of ``config`` as the table writes it."""
    if config.small_batch:
        return f"small({_tuple('GemvConfig', config.gemv1)}, {_tuple('GemvConfig', config.gemv2)})"
    g1, g2 = _tuple("GemmConfig", config.gemm1), _tuple("GemmConfig", config.gemm2)
    return f"grouped({config.block_m}, {g1}, {g2}, {config.atomic_combine})"


def _tuple(name: str, values: tuple) -> str:
    return f"{name}({', '.join(str(v) for v in values)})"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Measured on an NVIDIA H100 80GB HBM3 (torch 2.11, Triton 3.6) on 2026-12-06 by
# ``python -m sgl_ray.bench.moe_kernels --tune``: random routing (k distinct experts per token, uniform), random
# bf16 weights, each candidate timed as a CUDA graph of one call per weight set (8 sets, so L2 holds no experts;
# 2 sets above T = 256), median of 10 replays; the GEMV and GEMM tiles tuned in turn per block_m. The reduction
# combine beat fp32 atomics at every size (Qwen3-30B-A3B, T = 4096: 902 against 1173 us), and the small-batch path
# won up to T = 8 (Qwen3-30B-A3B; T = 1: 30.6 us against 40.5 us grouped) and T = 4 (Mixtral-8x7B).
TABLE: dict[tuple[int, int, int, str], tuple[tuple[int, LaunchConfig], ...]] = {
    (128, 2048, 768, "bfloat16"): (
        (1, small(GemvConfig(2, 512, 1, 4, 1), GemvConfig(2, 1024, 4, 4, 4))),
        (2, small(GemvConfig(2, 512, 1, 4, 1), GemvConfig(2, 512, 2, 4, 2))),
        (4, small(GemvConfig(2, 512, 1, 4, 1), GemvConfig(2, 512, 2, 4, 2))),
        (8, small(GemvConfig(2, 512, 1, 4, 1), GemvConfig(2, 512, 2, 4, 2))),
        (16, grouped(16, GemmConfig(128, 128, 1, 8, 3), GemmConfig(64, 128, 1, 4, 3), False)),
        (32, grouped(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4), False)),
        (64, grouped(16, GemmConfig(128, 128, 1, 8, 3), GemmConfig(64, 128, 1, 4, 4), False)),
        (128, grouped(16, GemmConfig(128, 128, 1, 8, 3), GemmConfig(64, 128, 1, 4, 4), False)),
        (256, grouped(32, GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 8, 3), False)),
        (1024, grouped(64, GemmConfig(64, 64, 8, 4, 3), GemmConfig(128, 64, 8, 8, 4), False)),
        (4096, grouped(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(128, 64, 8, 8, 3), False)),
    ),
    (8, 4096, 14336, "bfloat16"): (
        (1, small(GemvConfig(1, 2048, 2, 4, 1), GemvConfig(4, 1024, 4, 4, 4))),
        (2, small(GemvConfig(1, 2048, 2, 4, 1), GemvConfig(4, 1024, 4, 4, 4))),
        (4, small(GemvConfig(2, 1024, 2, 4, 1), GemvConfig(4, 1024, 4, 4, 4))),
        (8, grouped(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(128, 128, 1, 8, 3), False)),
        (16, grouped(16, GemmConfig(128, 128, 1, 8, 3), GemmConfig(128, 128, 1, 8, 3), False)),
        (32, grouped(16, GemmConfig(128, 128, 1, 8, 3), GemmConfig(128, 128, 1, 8, 3), False)),
        (64, grouped(32, GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 8, 3), False)),
        (128, grouped(32, GemmConfig(64, 128, 8, 4, 3), GemmConfig(128, 64, 8, 8, 3), False)),
        (256, grouped(64, GemmConfig(64, 128, 8, 4, 3), GemmConfig(128, 64, 8, 8, 3), False)),
        (1024, grouped(128, GemmConfig(128, 64, 8, 8, 4), GemmConfig(256, 64, 8, 8, 3), False)),
        (4096, grouped(128, GemmConfig(128, 64, 8, 8, 3), GemmConfig(256, 64, 8, 8, 3), False)),
    ),
}


def launch_config(
    num_experts: int, hidden: int, inter: int, dtype: torch.dtype, tokens: int, top_k: int
) -> LaunchConfig:
    """The configuration for a batch of ``tokens`` through ``num_experts`` local experts of this shape.

    >>> launch_config(128, 2048, 768, torch.bfloat16, 1, 8).small_batch
    True
    """
    buckets = TABLE.get((num_experts, hidden, inter, _dtype_name(dtype)))
    if not buckets:
        return default_config(num_experts, hidden, inter, dtype, tokens, top_k)
    for max_tokens, config in buckets:
        if tokens <= max_tokens:
            return config
    return buckets[-1][1]


def default_config(
    num_experts: int, hidden: int, inter: int, dtype: torch.dtype, tokens: int, top_k: int
) -> LaunchConfig:
    """A shape-agnostic guess: GEMVs while the experts see about a row each (on an H100 the measured crossover
    was T = 16 for Qwen3-30B-A3B, T = 4 for Mixtral-8x7B), then grouped tiles whose
    ``block_m`` follows the mean rows per expert (fp32 tiles halved along K for shared memory)."""
    pairs = tokens * top_k
    wide = dtype == torch.float32
    if tokens <= 16 and pairs <= max(8, num_experts):  # about one row per expert or fewer
        if wide:
            return small(GemvConfig(2, 256, 1, 3), GemvConfig(4, 128, 2, 3, 2))
        return small()
    rows_per_expert = pairs / max(1, num_experts)
    block_k = 32 if wide else 64
    if rows_per_expert <= 16:
        tile = GemmConfig(64, block_k, 1, 4, 3)
        return grouped(16, tile, tile)
    if rows_per_expert <= 64:
        tile = GemmConfig(64, block_k, 8, 4, 3)
        return grouped(32, tile, tile)
    tile = GemmConfig(64 if wide else 128, block_k, 8, 4 if wide else 8, 3)
    return grouped(64, tile, tile)
