"""GGUF tensors kept quantized: a matrix of llama.cpp blocks, decoded a slab of rows at a time.

A ggml row is a whole number of blocks, so rows decode independently and any row range is a plain slice. The
blocks' bytes are held regrouped by field (struct of arrays: every block's ``d``, then every block's ``qs``, …),
the same bytes as the file's, so that a slab's fields are contiguous for the decoder::

    file:   [d m qs][d m qs][d m qs] …          (one row: cols / block_size blocks)
    here:   d  [rows, n_blocks * 2]
            m  [rows, n_blocks * 2]
            qs [rows, n_blocks * 16]

A column range (a row-parallel shard) must start and end on a block boundary (32 values, 256 for K-quants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from sgl_ray.layers.quantization.base import QuantizedMatrix
from sgl_ray.layers.quantization.gguf_formats import FORMATS, BlockFormat


class GGUFMatrix(QuantizedMatrix):
    """``[rows, cols]`` values as GGUF blocks of ``qtype`` (one of
    :data:`~sgl_ray.layers.quantization.gguf_formats.FORMATS`).

    >>> import numpy as np
    >>> from gguf.quants import quantize
    >>> w = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    >>> m = GGUFMatrix.from_blocks(torch.from_numpy(quantize(w, GGMLQuantizationType.Q8_0)), GGMLQuantizationType.Q8_0)
    >>> m.shape, m.nbytes, m.dequantize(1, 3).shape
    (torch.Size([4, 64]), 272, torch.Size([2, 64]))
    """

    def __init__(self, qtype: GGMLQuantizationType, fields: dict[str, torch.Tensor], cols: int) -> None:
        self.format: BlockFormat = FORMATS[qtype]
        self.kind = qtype.name
        self.fields = fields  # name -> uint8 [rows, n_blocks * field_bytes]
        self.cols = cols

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, qtype: GGMLQuantizationType) -> GGUFMatrix:
        """From the file's layout: uint8 ``[rows, row_bytes]``, each row ``cols / block_size`` blocks."""
        fmt = FORMATS[qtype]
        rows, n_blocks = blocks.shape[0], blocks.shape[1] // fmt.type_size
        flat = blocks.reshape(rows * n_blocks, fmt.type_size)
        fields, start = {}, 0
        for name, size in fmt.fields:
            fields[name] = flat[:, start : start + size].reshape(rows, n_blocks * size).contiguous()
            start += size
        return cls(qtype, fields, n_blocks * fmt.block_size)

    def to_blocks(self) -> torch.Tensor:
        """The file's layout again: uint8 ``[rows, row_bytes]``."""
        rows, n = self.shape[0], self.n_blocks
        parts = [self.fields[name].view(rows, n, size) for name, size in self.format.fields]
        return torch.cat(parts, dim=2).view(rows, -1)

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.format.qtype

    @property
    def n_blocks(self) -> int:
        return self.cols // self.format.block_size

    @property
    def shape(self) -> torch.Size:
        return torch.Size((next(iter(self.fields.values())).shape[0], self.cols))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.fields.values())

    @property
    def col_align(self) -> int:
        return self.format.block_size

    def _decode(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = next(iter(fields.values())).shape[0]
        flat = {name: t.reshape(rows * self.n_blocks, -1) for name, t in fields.items()}
        return self.format.decode(flat).view(rows, self.cols)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self._decode({name: t[start:end] for name, t in self.fields.items()})

    def matmul(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        fmt = self.format
        if fmt.planes is None:
            return super().matmul(x, start, end)
        rows, half = min(end, self.shape[0]) - start, self.cols // 2
        low, high = fmt.planes(
            {n: t[start:end].reshape(rows * self.n_blocks, -1) for n, t in self.fields.items()}
        )
        halves = x.reshape(x.shape[0], -1, 2, fmt.plane_width)  # [T, groups, low/high, w]
        out = F.linear(halves[:, :, 0].reshape(-1, half), low.view(rows, half).to(x.dtype))
        return out.addmm_(halves[:, :, 1].reshape(-1, half), high.view(rows, half).to(x.dtype).t())

    def take_rows(self, index: torch.Tensor) -> torch.Tensor:
        return self._decode({name: t.index_select(0, index) for name, t in self.fields.items()})

    def narrow(self, dim: int, start: int, length: int) -> GGUFMatrix:
        if dim == 0:
            if start == 0 and length == self.shape[0]:
                return self
            # a copy: a shard must not keep the whole tensor's bytes alive
            rows = {n: t.narrow(0, start, length).clone() for n, t in self.fields.items()}
            return GGUFMatrix(self.qtype, rows, self.cols)
        if dim != 1:
            raise IndexError(f"dim {dim} out of range for a matrix")
        align = self.col_align
        if start % align or length % align:
            raise ValueError(
                f"columns [{start}, {start + length}) of a {self.kind} matrix do not fall on its {align}-value blocks"
            )
        sizes = dict(self.format.fields)
        fields = {
            n: t.narrow(1, start // align * sizes[n], length // align * sizes[n]).contiguous()
            for n, t in self.fields.items()
        }
        return GGUFMatrix(self.qtype, fields, length)

    def join(self, below: QuantizedMatrix) -> GGUFMatrix | None:
        if not (isinstance(below, GGUFMatrix) and below.qtype == self.qtype and below.cols == self.cols):
            return None
        return GGUFMatrix(
            self.qtype, {n: torch.cat([t, below.fields[n]]) for n, t in self.fields.items()}, self.cols
        )

    def to(self, device: torch.device) -> GGUFMatrix:
        if all(t.device == device for t in self.fields.values()):
            return self
        return GGUFMatrix(self.qtype, {n: t.to(device) for n, t in self.fields.items()}, self.cols)
