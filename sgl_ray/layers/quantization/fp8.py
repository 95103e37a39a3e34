"""FP8 (e4m3) weights with float32 scales: per row (per output channel; a per-tensor scale is one value for every
row) or per row and ``block_k`` columns (the 128x128 blocks of DeepSeek-V3 / Qwen3-FP8 checkpoints, held per row).

Layout::

    weight  float8_e4m3fn  [rows, cols]
    scale   float32        [rows, 1]                 per row:   value(r, c) = weight[r, c] * scale[r, 0]
                           [rows, ceil(cols / bk)]   per block: value(r, c) = weight[r, c] * scale[r, c // bk]

A checkpoint's block grid ``[ceil(rows / 128), ceil(cols / 128)]`` is repeated down the rows at load (4 bytes per
row and block: 1/32 more than the weight), so that rows stay independent and any row range is a shard. A column
range must start on a block (per-row scales: anywhere).

On CUDA (compute capability 8.9 or more) a product of several rows quantizes the activations per token (per token
and block for block scales) and runs the W8A8 GEMM of :mod:`.triton_fp8`; up to ``GEMV_MAX_ROWS`` rows take its
weight-only GEMV (the activations stay in 16 bits). On a CPU the weights are decoded a slab at a time (weight-only).
"""

from __future__ import annotations

import torch

from sgl_ray.errors import ModelLoadError
from sgl_ray.layers.quantization.base import QuantizedMatrix

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_TINY = 1e-12  # a scale floor: an all-zero row quantizes to zeros, not NaNs


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight fp8 [N, K], scale float32 [N, 1])`` for a float ``w`` [N, K]: each row scaled so that its largest
    magnitude is the format's largest value (online quantization, dynamic activation quantization)."""
    w = w.float()
    scale = (w.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_TINY)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_fp8_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 [M, K], float32 [M, K / group])``: each row's ``group``-column groups scaled on their own."""
    m, k = x.shape
    q, s = quantize_fp8_rows(x.reshape(m * k // group, group))
    return q.view(m, k), s.view(m, k // group)


class Fp8Matrix(QuantizedMatrix):
    """``[rows, cols]`` FP8 e4m3 values with per-row (``block_k`` None) or per-row-and-block float32 scales.

    >>> m = Fp8Matrix.from_float(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    >>> m.dequantize().tolist(), m.nbytes
    ([[1.0, -2.0], [0.5, 0.25]], 12)
    """

    kind = "FP8"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, block_k: int | None = None) -> None:
        blocks = 1 if block_k is None else -(-weight.shape[1] // block_k)
        if weight.dtype != FP8 or scale.shape != (weight.shape[0], blocks):
            raise ModelLoadError(
                f"FP8 weight {tuple(weight.shape)} {weight.dtype} with scales {tuple(scale.shape)}: expected "
                f"{FP8} and ({weight.shape[0]}, {blocks}) scales"
            )
        self.weight = weight  # fp8 [rows, cols]
        self.scale = scale.float()  # [rows, blocks]
        self.block_k = block_k

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Fp8Matrix:
        """Online quantization of a float ``[rows, cols]`` weight, one scale per row."""
        return cls(*quantize_fp8_rows(w))

    @classmethod
    def from_checkpoint(
        cls, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None
    ) -> Fp8Matrix:
        """A checkpoint's fp8 ``weight`` [N, K] and its ``scale``: one value (per tensor), ``[N]``/``[N, 1]`` (per
        channel), or with ``block`` = (rows, cols) the grid ``[ceil(N / rows), ceil(K / cols)]``."""
        n, k = weight.shape
        scale = scale.float()
        if block is not None and scale.dim() == 2 and scale.numel() > 1:
            block_n, block_k = block
            grid = (-(-n // block_n), -(-k // block_k))
            if tuple(scale.shape) != grid:
                raise ModelLoadError(
                    f"FP8 block scales {tuple(scale.shape)} for a {n}x{k} weight: expected {grid}"
                )
            return cls(weight, scale.repeat_interleave(block_n, dim=0)[:n].contiguous(), block_k)
        if scale.numel() == 1:
            return cls(weight, scale.reshape(1, 1).expand(n, 1).contiguous())
        if scale.numel() == n:
            return cls(weight, scale.reshape(n, 1).contiguous())
        raise ModelLoadError(f"FP8 scale {tuple(scale.shape)} fits no scheme for a {n}x{k} weight")

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale.nbytes

    @property
    def col_align(self) -> int:
        return 1 if self.block_k is None else self.block_k

    def _decode(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        if self.block_k is None:
            return w * scale
        return w * scale.repeat_interleave(self.block_k, dim=1)[:, : w.shape[1]]

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self._decode(self.weight[start:end], self.scale[start:end])

    def take_rows(self, index: torch.Tensor) -> torch.Tensor:
        return self._decode(self.weight[index], self.scale[index])

    def matmul(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if not x.is_cuda:
            return super().matmul(x, start, end)
        from sgl_ray.layers.quantization import triton_fp8

        return triton_fp8.fp8_linear(x, self.weight[start:end], self.scale[start:end], self.block_k)

    def narrow(self, dim: int, start: int, length: int) -> Fp8Matrix:
        if dim == 0:
            if start == 0 and length == self.shape[0]:
                return self
            # copies: a shard must not keep the whole tensor's bytes alive
            rows = slice(start, start + length)
            return Fp8Matrix(self.weight[rows].clone(), self.scale[rows].clone(), self.block_k)
        if dim != 1:
            raise IndexError(f"dim {dim} out of range for a matrix")
        weight = self.weight[:, start : start + length].contiguous()
        if self.block_k is None:
            return Fp8Matrix(weight, self.scale, None)
        if start % self.block_k or (length % self.block_k and start + length != self.shape[1]):
            raise ValueError(
                f"columns [{start}, {start + length}) of an FP8 matrix do not fall on its {self.block_k}-column "
                "blocks"
            )
        first = start // self.block_k
        scale = self.scale[:, first : first + -(-length // self.block_k)].contiguous()
        return Fp8Matrix(weight, scale, self.block_k)

    def join(self, below: QuantizedMatrix) -> Fp8Matrix | None:
        if not (
            isinstance(below, Fp8Matrix) and below.block_k == self.block_k and below.shape[1] == self.shape[1]
        ):
            return None
        return Fp8Matrix(
            torch.cat([self.weight, below.weight]), torch.cat([self.scale, below.scale]), self.block_k
        )

    def to(self, device: torch.device) -> Fp8Matrix:
        if self.weight.device == device:
            return self
        return Fp8Matrix(self.weight.to(device), self.scale.to(device), self.block_k)
