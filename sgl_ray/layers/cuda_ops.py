"""Access to the fused CUDA kernels (:mod:`sgl_ray.layers.triton_ops`), imported on first use: CPU installs have no
Triton, and the layers call this only for CUDA tensors."""

from __future__ import annotations

from types import ModuleType

_ops: ModuleType | None = None


def cuda_ops() -> ModuleType:
    global _ops
    if _ops is None:
        from sgl_ray.layers import triton_ops

        _ops = triton_ops
    return _ops
