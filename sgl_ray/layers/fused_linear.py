"""Projections fused with the op before them, on one-row CUDA steps (batch-1 decode).

At batch 1 every small kernel between two GEMVs adds a few microseconds of latency that streaming weights
cannot hide (on an H200, RMSNorm between two GEMVs: ~3 µs each, 65 per step of an 8B model). Here the op runs
inside the next projection's GEMV as it reads its input (:mod:`sgl_ray.layers.triton_gemv`):

- :func:`norm_linear`: ``RMSNorm`` (with the residual add) then a column-parallel projection (QKV, gate/up);
- :func:`silu_mul_linear`: ``SiluAndMul`` then a row-parallel projection (down), its all-reduce unchanged;
- :func:`norm_qkv_rotary_store`: the QKV projection with the op after it as its epilogue, rotary on q and k and
  the KV-pool store of k and v (``triton_gemv.qkv_rotary_store_gemv``: the same bits as the separate kernel);
- folded norms (``FOLD_NORMS``, :func:`fold_norms_if_supported`): each decoder layer's norm scales go into the
  projection after the norm at load, and on one row the norm is split over the GEMVs around it: the producer
  (O, down) adds the residual and writes sums of squares, the consumer (QKV, gate/up) scales its product
  (``LlamaDecoderLayer.forward_folded``; in MoE layers the router's GEMV and the experts' two GEMVs play the
  consumer and producer, ``SparseMoeBlock.forward_folded``). Measured on an H200: 80-110 µs less per bs1 step of
  the 8B shape.

Quantized weights held as FP8 with per-row scales or INT4 without act order take the same one-row GEMVs (the
kernel decodes them as it streams them; folded norms stay off for them). The RMSNorm fusion is off
(``FUSE_NORM``: it measured slower). Anything else (several rows, a CPU, LoRA-wrapped layers, fp32, other
encodings) takes the separate modules, with the same results up to the order of the RMSNorm sum.
"""

from __future__ import annotations

import torch
from torch import nn

from sgl_ray.distributed import ShardContext
from sgl_ray.layers.activation import SiluAndMul
from sgl_ray.layers.cuda_ops import cuda_ops
from sgl_ray.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from sgl_ray.layers.norm import RMSNorm
from sgl_ray.layers.quantization import QuantizedWeight

# Off: measured slower on an H200 (8B shape, bs1, 2026-12-02): with the norm inside, QKV took 56 µs instead of
# 15.5 and gate/up 86 instead of 58, since each of thousands of programs first reads the whole row for its
# scale; the step went from 4.37 to 5.29 ms. SiLU-and-mul needs no such pass and stays fused.
FUSE_NORM = False
# On: one launch fewer per layer (rotary + KV store inside the QKV GEMV).
FUSE_ROTARY_STORE = True
# On: the decoder layers' RMSNorm scales are folded into the projections after them at load (where
# fold_norms_if_supported), and one-row steps run each norm inside its GEMVs (see LlamaDecoderLayer.forward_folded).
FOLD_NORMS = True

_COLUMN = (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear)
_PLAIN = (*_COLUMN, RowParallelLinear)


def _gemv_weight(layer: nn.Module) -> tuple[torch.Tensor | None, dict]:
    """``(weight, keywords)`` as the one-row GEMVs take the layer's weight: as it is, or a quantized weight as
    held (FP8 with per-row scales, INT4 without act order: ``QuantizedWeight.gemv_operands``); ``(None, {})`` for
    other quantized weights (FP8 block scales, GGUF), which run their own kernels inside the layer."""
    w = layer.weight
    if not isinstance(w, QuantizedWeight):
        return w, {}
    operands = w.gemv_operands()
    return operands if operands is not None else (None, {})


def _one_row_gemv(x: torch.Tensor, layer: nn.Module, types: tuple[type, ...]) -> bool:
    if not (x.is_cuda and type(layer) in types):
        return False
    weight = _gemv_weight(layer)[0]
    return weight is not None and cuda_ops().gemv_supports(x, weight)


def norm_linear(
    norm: RMSNorm, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer(norm(x + residual)), x + residual)``; without ``residual``, ``(layer(norm(x)), x)``."""
    if FUSE_NORM and _one_row_gemv(x, layer, _COLUMN) and (residual is None or residual.stride(1) == 1):
        if isinstance(layer.weight, QuantizedWeight):  # the fused norm takes plain weights only
            h, residual = (norm(x), x) if residual is None else norm(x, residual)
            return layer(h), residual
        return cuda_ops().rmsnorm_gemv(x, residual, norm.weight, norm.eps, layer.weight, layer.bias)
    if residual is None:
        return layer(norm(x)), x
    h, residual = norm(x, residual)
    return layer(h), residual


def fold_norms_if_supported(
    model: nn.Module, device: torch.device, dtype: torch.dtype, shard: ShardContext, lora: bool
) -> None:
    """Fold the model's norms (``model.fold_norm_weights()``) where ``FOLD_NORMS`` and the settings allow: a
    CUDA device, half precision, one unsharded stage (the producing GEMV adds the residual, which an
    all-reduce would have to precede), no LoRA (adapters take the normed input with its scale), no quantized
    weights (their products run in their own kernels)."""
    half = dtype in (torch.bfloat16, torch.float16)
    single = shard.tp.world_size == 1 and shard.pp_size == 1
    if (
        FOLD_NORMS
        and device.type == "cuda"
        and half
        and single
        and not lora
        and hasattr(model, "fold_norm_weights")
        and not any(isinstance(m, QuantizedWeight) for m in model.modules())
    ):
        model.fold_norm_weights()


def one_row_gemvs(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether each of ``layers`` (plain, not LoRA-wrapped) takes the one-row GEMV for an input like ``x``."""
    return all(_one_row_gemv(x, layer, _PLAIN) for layer in layers)


def fuses_rotary_store(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`norm_qkv_rotary_store` takes this step: one CUDA row into a plain QKV projection."""
    return (
        FUSE_ROTARY_STORE
        and _one_row_gemv(x, layer, (QKVParallelLinear,))
        and cuda_ops().rotary_store_supports(x, _gemv_weight(layer)[0], layer.head_dim)
    )


def norm_qkv_rotary_store(
    norm: RMSNorm, layer: QKVParallelLinear, x: torch.Tensor, residual: torch.Tensor | None, store: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qkv, x + residual)`` as :func:`norm_linear` returns them, except that q and k come out rotated and k
    and v are in the KV pool already (``store``: a ``triton_ops.RotaryStore``). Only where
    :func:`fuses_rotary_store`."""
    h, residual = (norm(x), x) if residual is None else norm(x, residual)
    weight, quant = _gemv_weight(layer)
    return cuda_ops().qkv_rotary_store_gemv(h, weight, layer.bias, store, **quant), residual


def silu_mul_linear(act: SiluAndMul, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(act(x))`` for ``x = [gate | up]``."""
    if _one_row_gemv(x, layer, (RowParallelLinear,)):
        single = layer.tp.world_size == 1
        weight, quant = _gemv_weight(layer)
        partial = cuda_ops().silu_mul_gemv(x, weight, layer.bias if single else None, **quant)
        return partial if single else layer.reduce(partial)
    return layer(act(x))
