"""The seam between a compact weight encoding and the layers that multiply by it.

A :class:`QuantizedMatrix` is a ``[rows, cols]`` matrix held in some encoding: GGUF blocks (:mod:`.gguf`), INT4
groups from AWQ or GPTQ checkpoints (:mod:`.int4`), FP8 e4m3 with per-row or per-block scales (:mod:`.fp8`). The
layers never look inside: they cut it for their tensor-parallel rank (:meth:`~QuantizedMatrix.narrow`), stack the
pieces of a fused projection (:class:`~sgl_ray.layers.quantization.weight.QuantizedWeight`), and ask for its product
(:meth:`~QuantizedMatrix.matmul`: float rows a slab at a time on a CPU, the encoding's kernel on CUDA).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F


class QuantizedMatrix(ABC):
    """A ``[rows, cols]`` matrix in a compact encoding.

    Contract:

    * rows are independent: any row range (:meth:`dequantize`) or row subset (:meth:`take_rows`) decodes on its
      own, to exactly the values the whole matrix decodes to;
    * :meth:`narrow` along rows accepts any range; along columns only multiples of :attr:`col_align` (the
      encoding's blocks), else it raises :class:`ValueError`;
    * :meth:`join` stacks another matrix's rows under this one's when both share an encoding (else ``None``);
    * :meth:`to` gives the same matrix with its tensors on another device (itself when already there).
    """

    kind: str
    """The encoding's name, e.g. ``"Q4_1"``."""

    @property
    @abstractmethod
    def shape(self) -> torch.Size: ...

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held in memory."""

    @property
    def col_align(self) -> int:
        return 1

    @abstractmethod
    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """float32 ``[end - start, cols]``: rows ``start:end`` (all by default)."""

    def matmul(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """``F.linear(x, rows start:end)``: ``x`` [T, cols] -> [T, end - start], in ``x``'s dtype. Encodings may
        reorder the summation (never the values)."""
        return F.linear(x, self.dequantize(start, end).to(x.dtype))

    @abstractmethod
    def take_rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(index), cols]``: the rows ``index`` (int64) names, only those decoded."""

    @abstractmethod
    def narrow(self, dim: int, start: int, length: int) -> QuantizedMatrix: ...

    @abstractmethod
    def join(self, below: QuantizedMatrix) -> QuantizedMatrix | None: ...

    @abstractmethod
    def to(self, device: torch.device) -> QuantizedMatrix: ...

    def dim(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind}, {tuple(self.shape)})"


class DenseRows(QuantizedMatrix):
    """Plain float rows among quantized ones: a checkpoint piece stored unquantized (an F16/F32 tensor of a
    fused projection whose other parts are quantized), or a vocabulary shard's zero padding."""

    kind = "dense"

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values  # [rows, cols]

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self.values[start:end].float()

    def take_rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.values[index].float()

    def narrow(self, dim: int, start: int, length: int) -> DenseRows:
        return DenseRows(self.values.narrow(dim, start, length).clone())

    def join(self, below: QuantizedMatrix) -> QuantizedMatrix | None:
        if isinstance(below, DenseRows) and below.values.dtype == self.values.dtype:
            return DenseRows(torch.cat([self.values, below.values]))
        return None

    def to(self, device: torch.device) -> DenseRows:
        return self if self.values.device == device else DenseRows(self.values.to(device))
