"""The Triton MoE kernels under Triton's CPU interpreter: the align step's exact output (one chunk and many),
and both paths (small batch and grouped GEMM) against the torch backend on tiny shapes, with an EP range, -1
ids, an expert that takes every token, biases, both activations and counts (the device runs the full set:
tests/gpu/test_moe_kernels.py)."""

from __future__ import annotations

_SCRIPT = """
import torch
from tests.gpu.test_moe_kernels import TINY_SMALL, check_paths, check_residual_step, check_sort_pairs
check_sort_pairs("cpu", 3, 2, 4, 0, 4, 16)
check_sort_pairs("cpu", 300, 8, 64, 64, 256, 32)  # 38 chunks
check_sort_pairs("cpu", 2100, 8, 4, 4, 12, 64)  # chunks of two one-hot tiles
check_paths("cpu", torch.float32)
check_paths("cpu", torch.float16)
check_residual_step("cpu", torch.float32, TINY_SMALL)
check_residual_step("cpu", torch.float16, TINY_SMALL)
"""


def test_moe_kernels_in_the_interpreter(triton_interpreter) -> None:
    error = triton_interpreter.run(_SCRIPT)
    assert not error, error[-3000:]
