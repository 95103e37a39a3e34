"""A layer's weight held quantized, and how the layers' weight loaders put checkpoint pieces into it.

:class:`QuantizedWeight` takes the place of a linear layer's ``[out, in]`` weight parameter (or an embedding
table's) once a quantized checkpoint piece arrives for it. Its rows are stacked segments, one per checkpoint
piece (a fused QKV projection: q, k and v, each maybe of its own block type), neighbours of one encoding merged::

    rows 0    ┌────────────┐
              │ q  (Q4_K)  │  ┐ one segment: q and k share an encoding
              │ k  (Q4_K)  │  ┘
              │ v  (Q6_K)  │
    rows out  └────────────┘

Its product (:meth:`QuantizedWeight.linear`) on a CPU decodes a slab of at most ``SLAB_VALUES`` weights at a time
into a float scratch and multiplies by it, so the extra memory stays a few MiB, and each output value is the dot
product of the same float weights as when dequantized at load (only the GEMM's summation order may differ). On CUDA
each segment is one product: its encoding's kernel decodes the weights inside the GEMM (INT4, FP8).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.quantization.base import DenseRows, QuantizedMatrix

SLAB_VALUES = 1 << 20
"""Weights decoded per slab: a 4 MiB float32 scratch (each slab costs some tens of torch ops, so fewer, larger
slabs are faster: 2^16-value slabs made a decode step of the default model several times slower on 2 cores)."""


class QuantizedWeight(nn.Module):
    """A ``[rows, cols]`` weight made of :class:`QuantizedMatrix` row segments, multiplied in ``dtype``. Its bytes
    live on ``device`` (each piece moves there as it is put); ``Module.to`` does not move them.

    >>> w = QuantizedWeight(2, 3, torch.float32, torch.device("cpu"))
    >>> w.put(0, DenseRows(torch.ones(2, 3)))
    >>> w.linear(torch.ones(1, 3)).tolist()
    [[3.0, 3.0]]
    """

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.rows, self.cols, self.dtype, self.device = rows, cols, dtype, device
        self.segments: list[tuple[int, QuantizedMatrix]] = []  # (first row, matrix), by first row

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.cols))

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for _, m in self.segments)

    @property
    def kinds(self) -> list[str]:
        return [m.kind for _, m in self.segments]

    def extra_repr(self) -> str:
        return f"{self.rows}, {self.cols}, {'+'.join(self.kinds)}, {self.nbytes} bytes"

    def put(self, offset: int, piece: QuantizedMatrix) -> None:
        """Rows ``offset : offset + len(piece)`` are ``piece``; merged with an adjacent segment of its encoding."""
        rows, cols = piece.shape
        if cols != self.cols or offset < 0 or offset + rows > self.rows:
            raise ValueError(
                f"weight shape mismatch: rows [{offset}, {offset + rows}) x {cols} columns of a "
                f"{tuple(self.shape)} weight"
            )
        piece = piece.to(self.device)
        segments = [(s, m) for s, m in self.segments if s + m.shape[0] <= offset or s >= offset + rows]
        segments.append((offset, piece))  # replaces whatever it overlaps (a reload)
        segments.sort(key=lambda seg: seg[0])
        merged: list[tuple[int, QuantizedMatrix]] = []
        for start, m in segments:
            if merged and merged[-1][0] + merged[-1][1].shape[0] == start:
                joined = merged[-1][1].join(m)
                if joined is not None:
                    merged[-1] = (merged[-1][0], joined)
                    continue
            merged.append((start, m))
        self.segments = merged

    def _check_complete(self) -> None:
        if sum(m.shape[0] for _, m in self.segments) != self.rows:
            covered = [(s, s + m.shape[0]) for s, m in self.segments]
            raise RuntimeError(f"quantized weight {tuple(self.shape)} has only rows {covered} loaded")

    def gemv_operands(self) -> tuple[torch.Tensor, dict] | None:
        """``(weight, keywords)`` for the one-row GEMVs of :mod:`sgl_ray.layers.triton_gemv` (and their fused
        forms), which read the weight as it is held: one FP8 matrix with per-row scales (``weight_scale``), or one
        INT4 matrix without act order (its words, ``weight_scale``, ``weight_zeros``, ``group_size``). None for any
        other encoding or a weight of several segments."""
        from sgl_ray.layers.quantization.fp8 import Fp8Matrix
        from sgl_ray.layers.quantization.int4 import Int4Matrix

        if len(self.segments) != 1 or self.segments[0][1].shape[0] != self.rows:
            return None
        m = self.segments[0][1]
        if isinstance(m, Fp8Matrix) and m.block_k is None:
            return m.weight, {"weight_scale": m.scale.view(-1)}
        if (
            isinstance(m, Int4Matrix)
            and m.g_idx is None
            and m.group_size % 8 == 0
            and m.scales.is_contiguous()
            and m.zeros.is_contiguous()
        ):
            return m.qweight, {"weight_scale": m.scales, "weight_zeros": m.zeros, "group_size": m.group_size}
        return None

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, W, bias)``, ``W`` decoded a slab of rows at a time (on CUDA: a segment at a time)."""
        self._check_complete()
        x2 = x.reshape(-1, self.cols)  # [T, cols]
        outs = []
        for _, m in self.segments:
            step = m.shape[0] if x.is_cuda else max(1, SLAB_VALUES // self.cols)
            for r in range(0, m.shape[0], step):
                outs.append(m.matmul(x2, r, min(r + step, m.shape[0])))  # [T, slab rows]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], self.rows)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """``F.embedding(ids, W)``: only the looked-up rows are decoded."""
        self._check_complete()
        flat = ids.reshape(-1)
        if len(self.segments) == 1:
            out = self.segments[0][1].take_rows(flat).to(self.dtype)
        else:
            out = torch.empty(flat.shape[0], self.cols, dtype=self.dtype, device=ids.device)
            for start, m in self.segments:
                hit = ((flat >= start) & (flat < start + m.shape[0])).nonzero().squeeze(1)
                if hit.numel():
                    out[hit] = m.take_rows(flat[hit] - start).to(self.dtype)
        return out.view(*ids.shape, self.cols)

    def dequantize(self) -> torch.Tensor:
        """The whole weight as ``dtype`` (tests, debugging)."""
        self._check_complete()
        return torch.cat([m.dequantize() for _, m in self.segments]).to(self.dtype)


def load_rows(
    module: nn.Module, param: torch.Tensor, offset: int, piece: torch.Tensor | QuantizedMatrix
) -> None:
    """Write ``piece`` as rows ``offset : offset + len(piece)`` of ``param``, the tensor a weight loader of
    ``module`` was handed (all of its columns).

    When ``param`` is ``module.weight`` (or the dense parameter a :class:`QuantizedWeight` replaced), a quantized
    piece makes the weight a :class:`QuantizedWeight`: the rows loaded dense so far move into it, and later dense
    pieces join it as :class:`DenseRows`. Any other tensor (a LoRA slot) takes dense pieces only.
    """
    current = module.weight
    replaced = module.__dict__.get("_dense_weight")
    is_weight = param is current or (replaced is not None and replaced() is param)
    if not is_weight or (not isinstance(current, QuantizedWeight) and not isinstance(piece, QuantizedMatrix)):
        if isinstance(piece, QuantizedMatrix):
            piece = piece.dequantize()
        if offset + piece.shape[0] > param.shape[0] or param.shape[1:] != piece.shape[1:]:
            raise ValueError(
                f"weight shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(piece.shape)}"
                + (f" at row {offset}" if offset else "")
            )
        param.data.narrow(0, offset, piece.shape[0]).copy_(piece)
        if is_weight:
            module.__dict__.setdefault("_dense_rows", []).append((offset, piece.shape[0]))
        return
    if not isinstance(piece, QuantizedMatrix):
        piece = DenseRows(piece.to(current.dtype).clone())
    if not isinstance(current, QuantizedWeight):
        weight = QuantizedWeight(current.shape[0], current.shape[1], current.dtype, current.device)
        for start, rows in module.__dict__.pop("_dense_rows", []):
            weight.put(start, DenseRows(current.data[start : start + rows].clone()))
        module.__dict__["_dense_weight"] = weakref.ref(current)
        del module.weight
        module.weight = weight
        current = weight
    current.put(offset, piece)


def narrow_columns(
    piece: torch.Tensor | QuantizedMatrix, start: int, length: int
) -> torch.Tensor | QuantizedMatrix:
    """``piece.narrow(1, start, length)`` (a row-parallel shard's columns); a quantized piece whose blocks the
    range would split raises :class:`UnsupportedModelError`, naming the option that dequantizes at load."""
    try:
        return piece.narrow(1, start, length)
    except ValueError as exc:
        if not isinstance(piece, QuantizedMatrix):
            raise
        raise UnsupportedModelError(
            f"tensor parallelism cannot split this quantized weight {tuple(piece.shape)} by columns: {exc}; "
            "start with quantization='none' (--quantization none) to dequantize it at load, or use another tp_size"
        ) from None


def weight_nbytes(model: nn.Module) -> int:
    """Bytes the model's weights take as held: every parameter's storage once, plus the quantized weights."""
    storages: dict[int, int] = {}
    for p in model.parameters():
        storage = p.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    quantized = {id(m): m.nbytes for m in model.modules() if isinstance(m, QuantizedWeight)}
    return sum(storages.values()) + sum(quantized.values())
