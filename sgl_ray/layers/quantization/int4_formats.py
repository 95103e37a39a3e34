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

:func:`quantize_awq` and :func:`quantize_gptq` go the other way, from a float weight to a checkpoint's tensors, by
rounding to nearest without calibration (``quantization="awq"`` / ``"gptq"`` on a float model quantizes at load
with them: :func:`int4_from_float`): AWQ's asymmetric groups (scale ``(max - min) / 15`` over a range that holds 0,
zero point ``round(-min / scale)``), GPTQ's symmetric ones (``sym=True``: scale ``max|w| / 7.5``, zero point 8,
format v1). Scales are fp16, as the checkpoints store them, and the values are rounded against the fp16 scale.
"""

from __future__ import annotations

import torch

from sgl_ray.errors import ModelLoadError, UnsupportedModelError
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


INT4_GROUP_SIZE = 128
_MIN_SCALE = 1e-6  # an all-zero group gets this scale (and zeros), not a division by zero


def int4_group_size(in_features: int, preferred: int = INT4_GROUP_SIZE) -> int:
    """The group size of a layer of ``in_features`` inputs quantized at load: ``preferred`` where it divides them,
    else the largest power of two below it that does (SmolLM2-135M's 576 inputs: 64); at least 8."""
    size = preferred
    while size >= PACK:
        if in_features % size == 0:
            return size
        size //= 2
    raise UnsupportedModelError(
        f"INT4 at load needs each quantized layer's input features to be a multiple of {PACK}; a layer has "
        f"{in_features}. quantization='none' keeps the model in float",
        param="quantization",
    )


def _round_groups(
    w: torch.Tensor, group_size: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [N, K] 0..15, scales fp16 [N, G], zeros [N, G] 0..15)`` of a float ``w`` [N, K], rounded to nearest."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    if sym:
        scale = (g.abs().amax(dim=-1) / 7.5).clamp(min=_MIN_SCALE).half()
        zeros = torch.full(scale.shape, 8, dtype=torch.int32, device=w.device)
    else:
        lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=_MIN_SCALE).half()
        zeros = torch.round(-lo / scale.float()).clamp(0, 15).to(torch.int32)
    q = (torch.round(g / scale.float().unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, zeros


def quantize_awq(w: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """An AutoAWQ "gemm" checkpoint's ``qweight`` [K, N/8], ``qzeros`` [G, N/8] and ``scales`` [G, N] (fp16) for a
    float ``w`` [N, K]: asymmetric 4-bit groups of ``group_size`` inputs, rounded to nearest."""
    q, scale, zeros = _round_groups(w, group_size, sym=False)
    return {
        "qweight": pack_int4(q.t(), AWQ_ORDER),
        "qzeros": pack_int4(zeros.t(), AWQ_ORDER),
        "scales": scale.t().contiguous(),
    }


def quantize_gptq(w: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """A GPTQ (format v1, ``sym=True``, no act order) checkpoint's ``qweight`` [K/8, N], ``qzeros`` [G, N/8]
    (``zero - 1``), ``scales`` [G, N] (fp16) and ``g_idx`` [K] for a float ``w`` [N, K], rounded to nearest."""
    q, scale, zeros = _round_groups(w, group_size, sym=True)
    k = w.shape[1]
    return {
        "qweight": pack_int4(q).t().contiguous(),
        "qzeros": pack_int4((zeros - 1).t()),
        "scales": scale.t().contiguous(),
        "g_idx": torch.arange(k, dtype=torch.int32, device=w.device) // group_size,
    }


def int4_from_float(w: torch.Tensor, method: str, group_size: int | None = None) -> AWQMatrix | GPTQMatrix:
    """``w`` [N, K] quantized by :func:`quantize_awq` (``method="awq"``) or :func:`quantize_gptq` (``"gptq"``) and
    read back as a checkpoint of that format is (the same kept matrix); ``group_size`` defaults to
    :func:`int4_group_size`."""
    size = group_size or int4_group_size(w.shape[1])
    if method == "awq":
        t = quantize_awq(w, size)
        return awq_matrix(t["qweight"], t["qzeros"], t["scales"], size)
    if method == "gptq":
        t = quantize_gptq(w, size)
        return gptq_matrix(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], size, zero_offset=1)
    raise ValueError(f"INT4 method {method!r}: 'awq' or 'gptq'")
