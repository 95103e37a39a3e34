"""AWQ and GPTQ checkpoint tensors → :class:`~.int4.Int4Matrix` (4-bit, groups along the input, zero points).

The two formats store the same numbers packed differently (``K`` = input features, ``N`` = output features,
``G`` = groups; both put value ``i`` of an int32 word at bits ``4i`` unless said otherwise)::

    AWQ (AutoAWQ "gemm")   qweight [K, N / 8]  packed along the output, interleaved: output 8w + j of word w
                                               sits at bits 4 * AWQ_ORDER[j], AWQ_ORDER = 0 4 1 5 2 6 3 7
                           qzeros  [G, N / 8]  the same packing
                           scales  [G, N]      w = (q - z) * s, group of input k: k // group_size
    GPTQ (AutoGPTQ)        qweight [K / 8, N]  packed along the input, in order
                           qzeros  [G, N / 8]  packed along the output, in order; checkpoint format v1 stores
                                               zero - 1 (so z = stored + 1), v2 stores the zero itself
                           scales  [G, N]
                           g_idx   [K]         group of each input (act order: not k // group_size)

GPTQ's qweight transposed is already the kept layout; AWQ's is unpacked and packed again along the input.
"""

from __future__ import annotations

import torch

from sgl_ray.errors import ModelLoadError
from sgl_ray.layers.quantization.int4 import PACK, AWQMatrix, GPTQMatrix, pack_int4, unpack_int4

AWQ_ORDER = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
"""Nibble (of an AWQ int32 word) that holds output column ``8w + j``: ``AWQ_ORDER[j]``."""


def _check(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
        want = f"{shape}" + (f" {dtype}" if dtype is not None else "")
        raise ModelLoadError(
            f"{name}: expected {want}, the checkpoint has {tuple(tensor.shape)} {tensor.dtype}"
        )


def _groups(in_features: int, group_size: int, what: str) -> tuple[int, int]:
    """``(group_size, groups)`` with ``-1`` (one group per row) resolved."""
    size = in_features if group_size in (-1, 0) else group_size
    if in_features % PACK or in_features % size:
        raise ModelLoadError(f"{what}: {in_features} input features do not split into groups of {size}")
    return size, in_features // size


def awq_matrix(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> AWQMatrix:
    """An AWQ layer's ``qweight`` [K, N/8], ``qzeros`` [G, N/8] (int32) and ``scales`` [G, N] as kept."""
    k, n = qweight.shape[0], qweight.shape[1] * PACK
    size, groups = _groups(k, group_size, "AWQ weight")
    _check("AWQ qweight", qweight, (k, n // PACK), torch.int32)
    _check("AWQ qzeros", qzeros, (groups, n // PACK), torch.int32)
    _check("AWQ scales", scales, (groups, n))
    values = unpack_int4(qweight, AWQ_ORDER)  # [K, N]
    zeros = unpack_int4(qzeros, AWQ_ORDER)  # [G, N]
    return AWQMatrix(pack_int4(values.t()), scales.t().contiguous(), zeros.t().contiguous(), size)


def gptq_matrix(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    zero_offset: int,
) -> GPTQMatrix:
    """A GPTQ layer's ``qweight`` [K/8, N], ``qzeros`` [G, N/8] (int32), ``scales`` [G, N] and ``g_idx`` [K]
    (None: input ``k`` is in group ``k // group_size``) as kept; ``zero_offset``: 1 for checkpoint format v1."""
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    groups = scales.shape[0]
    if g_idx is None or group_size not in (-1, 0):
        size, expect = _groups(k, group_size, "GPTQ weight")
        if g_idx is None and groups != expect:
            raise ModelLoadError(f"GPTQ scales: {groups} groups, {expect} expected for group size {size}")
    else:
        size = k
    _check("GPTQ qweight", qweight, (k // PACK, n), torch.int32)
    _check("GPTQ qzeros", qzeros, (groups, n // PACK), torch.int32)
    _check("GPTQ scales", scales, (groups, n))
    zeros = unpack_int4(qzeros) + zero_offset  # [G, N], 0..16
    if g_idx is not None:
        _check("GPTQ g_idx", g_idx, (k,))
        g_idx = g_idx.to(torch.int32)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ModelLoadError(f"GPTQ g_idx names groups outside 0..{groups - 1}")
        in_order = torch.arange(k, dtype=torch.int32) // size
        if groups * size == k and torch.equal(g_idx, in_order):
            g_idx = None  # no act order: the kernels take groups by position
    return GPTQMatrix(qweight.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous(), size, g_idx)
