"""INT4 weight-only matrices (AWQ, GPTQ): 4-bit values in groups along the input, each group of a row with a scale
and a zero point, decoded inside the matmul.

Both checkpoint formats are repacked at load into one layout (:mod:`.int4_formats` reads them), so that rows
(output channels) are independent, as every :class:`~.base.QuantizedMatrix` needs, and one kernel serves both::

    qweight  int32  [rows, cols / 8]   column c of a row in bits 4 (c % 8) .. 4 (c % 8) + 3 of word c // 8
    scales   fp16   [rows, groups]     the checkpoint's dtype (fp16 or bf16)
    zeros    uint8  [rows, groups]     zero points 0..16 (GPTQ v1's "+1" can give 16)
    g_idx    int32  [cols] or None     the group of each column where it is not c // group_size (GPTQ act order)

    value(r, c) = (q(r, c) - zeros[r, g(c)]) * scales[r, g(c)]

A column range (a row-parallel shard) must hold whole groups (any multiple of 8 with ``g_idx`` or a single group:
the shard keeps every group's scales then). On CUDA the product runs in :mod:`.triton_int4` (decoded in registers,
never in memory); on a CPU a slab of rows is decoded to float32 and multiplied.
"""

from __future__ import annotations

import torch

from sgl_ray.layers.quantization.base import QuantizedMatrix

PACK = 8  # 4-bit values per int32 word
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # [8]: bit offset of value i of a word


def unpack_int4(words: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[..., n * 8]``: the eight 4-bit values of each int32 of ``words`` ``[..., n]``, lowest bits first, or
    value ``j`` of a word taken from bits ``4 * order[j]`` (AWQ's interleaved order)."""
    shifts = _SHIFTS.to(words.device) if order is None else 4 * order.to(words.device, torch.int32)
    values = (words.unsqueeze(-1) >> shifts) & 0xF  # [..., n, 8]
    return values.to(torch.uint8).flatten(-2)


def pack_int4(values: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """int32 ``[..., n / 8]`` from 4-bit ``values`` ``[..., n]``, value ``i`` of each word in bits ``4i``, or in
    bits ``4 * order[i]`` (the inverse of :func:`unpack_int4` with the same ``order``)."""
    v = values.to(torch.int32).unflatten(-1, (-1, PACK))  # [..., n / 8, 8]
    words = torch.zeros(v.shape[:-1], dtype=torch.int32, device=values.device)
    nibbles = range(PACK) if order is None else order.tolist()
    for i, nibble in enumerate(nibbles):
        words |= v[..., i] << (
            4 * nibble
        )  # the top value wraps into the sign bit, as packed checkpoints store it
    return words


class Int4Matrix(QuantizedMatrix):
    """``[rows, cols]`` INT4 values in the layout of this module's docstring.

    >>> w = Int4Matrix(pack_int4(torch.full((2, 16), 9)), torch.ones(2, 1, dtype=torch.float16),
    ...                torch.full((2, 1), 8, dtype=torch.uint8), group_size=16)
    >>> w.shape, w.nbytes, w.dequantize()[0, :3].tolist()
    (torch.Size([2, 16]), 22, [1.0, 1.0, 1.0])
    """

    kind = "INT4"

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        g_idx: torch.Tensor | None = None,
    ) -> None:
        self.qweight = qweight  # int32 [rows, cols / 8]
        self.scales = scales  # [rows, groups]
        self.zeros = zeros  # uint8 [rows, groups]
        self.group_size = group_size
        self.g_idx = g_idx  # int32 [cols] | None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.qweight.shape[0], self.qweight.shape[1] * PACK))

    @property
    def groups(self) -> int:
        return self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.g_idx is None else self.g_idx.nbytes
        return self.qweight.nbytes + self.scales.nbytes + self.zeros.nbytes + extra

    @property
    def col_align(self) -> int:
        return PACK if self.g_idx is not None or self.groups == 1 else self.group_size

    def _new(self, qweight, scales, zeros, group_size, g_idx) -> Int4Matrix:
        return type(self)(qweight, scales, zeros, group_size, g_idx)

    def _decode(self, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        rows = words.shape[0]
        q = unpack_int4(words).to(torch.int16)  # [rows, cols]
        if self.g_idx is not None:
            g = self.g_idx.long()
            return (q - zeros[:, g]).float() * scales[:, g].float()
        q = q.view(rows, self.groups, -1)  # [rows, groups, group_size]
        w = (q - zeros.unsqueeze(-1)).float() * scales.float().unsqueeze(-1)
        return w.view(rows, -1)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self._decode(self.qweight[start:end], self.scales[start:end], self.zeros[start:end])

    def take_rows(self, index: torch.Tensor) -> torch.Tensor:
        return self._decode(self.qweight[index], self.scales[index], self.zeros[index])

    def matmul(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if not x.is_cuda:
            return super().matmul(x, start, end)
        from sgl_ray.layers.quantization import triton_int4

        rows = slice(start, end)
        return triton_int4.int4_linear(
            x, self.qweight[rows], self.scales[rows], self.zeros[rows], self.group_size, self.g_idx
        )

    def narrow(self, dim: int, start: int, length: int) -> Int4Matrix:
        if dim == 0:
            if start == 0 and length == self.shape[0]:
                return self
            # copies: a shard must not keep the whole tensor's bytes alive
            rows = slice(start, start + length)
            return self._new(
                self.qweight[rows].clone(),
                self.scales[rows].clone(),
                self.zeros[rows].clone(),
                self.group_size,
                self.g_idx,
            )
        if dim != 1:
            raise IndexError(f"dim {dim} out of range for a matrix")
        align = self.col_align
        if start % align or length % align:
            raise ValueError(
                f"columns [{start}, {start + length}) of a {self.kind} matrix do not fall on its {align}-column "
                "groups"
            )
        words = self.qweight[:, start // PACK : (start + length) // PACK].contiguous()
        if self.g_idx is not None:  # act order: columns name their groups; every group's scales stay
            g_idx = self.g_idx[start : start + length].clone()
            return self._new(words, self.scales, self.zeros, self.group_size, g_idx)
        if self.groups == 1:
            return self._new(words, self.scales, self.zeros, length, None)
        groups = slice(start // self.group_size, (start + length) // self.group_size)
        return self._new(
            words,
            self.scales[:, groups].contiguous(),
            self.zeros[:, groups].contiguous(),
            self.group_size,
            None,
        )

    def join(self, below: QuantizedMatrix) -> Int4Matrix | None:
        if not (
            type(below) is type(self)
            and below.shape[1] == self.shape[1]
            and below.group_size == self.group_size
            and below.groups == self.groups
            and below.scales.dtype == self.scales.dtype
        ):
            return None
        if (self.g_idx is None) != (below.g_idx is None) or (
            self.g_idx is not None and not torch.equal(self.g_idx, below.g_idx)
        ):
            return None
        return self._new(
            torch.cat([self.qweight, below.qweight]),
            torch.cat([self.scales, below.scales]),
            torch.cat([self.zeros, below.zeros]),
            self.group_size,
            self.g_idx,
        )

    def to(self, device: torch.device) -> Int4Matrix:
        if self.qweight.device == device:
            return self
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        return self._new(
            self.qweight.to(device), self.scales.to(device), self.zeros.to(device), self.group_size, g_idx
        )


class AWQMatrix(Int4Matrix):
    """An AWQ checkpoint's INT4 weight (built by :func:`~.int4_formats.awq_matrix`)."""

    kind = "AWQ"


class GPTQMatrix(Int4Matrix):
    """A GPTQ checkpoint's INT4 weight (built by :func:`~.int4_formats.gptq_matrix`)."""

    kind = "GPTQ"
