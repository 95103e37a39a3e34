"""GGUF block formats decoded in torch, vectorised over blocks, bit-identical to the ``gguf`` package's numpy
reference (same operations in the same order; torch's CPU kernels fuse no multiply-add).

A format is a fixed struct per block of ``block_size`` values; :class:`BlockFormat` names its fields, and the
decoder takes each field as a ``uint8 [n_blocks, field_bytes]`` tensor (the field's bytes of ``n_blocks``
consecutive blocks). Scales are float16 (``d``, ``m``, ``dmin``) unless said::

    Q8_0  d | qs int8[32]                                       v = q * d
    Q4_0  d | qs[16]: low nibbles v0..15, high v16..31          v = d * (q - 8)
    Q4_1  d | m | qs[16]                                        v = d * q + m
    Q5_0  d | qh[4]: bit j = 5th bit of v_j | qs[16]            v = d * (q - 16)
    Q5_1  d | m | qh[4] | qs[16]                                v = d * q + m
    Q4_K  d | dmin | scales[12]: 8 x (6-bit sc, 6-bit mn) | qs[128]: per 64 values, 32 bytes (low nibbles the
          first 32, high the next)                              v = (d * sc) * q - dmin * mn   per 32 values
    Q5_K  as Q4_K, then qh[32]: bit i of byte j = 5th bit of value j of sub-block i, before qs
    Q6_K  ql[128] | qh[64] | scales int8[16] | d                v = (d * sc) * (q - 32)       per 16 values

Nibble formats (Q4_*, Q5_*) also decode as two *planes* (:attr:`BlockFormat.planes`): every group of ``2 w``
values of a row is ``w`` low nibbles then ``w`` high nibbles (``w`` = 16 for 32-value blocks, 32 for K-quants),
so the low plane holds the first half of each group and the high plane the second, each decoded with contiguous
2-D ops (interleaving the two halves back costs more than all the arithmetic). A product then multiplies each plane
by the matching half of the input, ``x.view(T, -1, 2, w)[:, :, 0]`` and ``[:, :, 1]``; the values are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_Q = GGMLQuantizationType
Fields = dict[str, torch.Tensor]  # field name -> uint8 [n_blocks, field_bytes]


@dataclass(frozen=True)
class BlockFormat:
    qtype: GGMLQuantizationType
    fields: tuple[tuple[str, int], ...]
    """``(name, bytes)`` in the order they lie in a block."""
    decode: Callable[[Fields], torch.Tensor]
    """Fields of ``n`` blocks -> float32 ``[n, block_size]``."""
    planes: Callable[[Fields], tuple[torch.Tensor, torch.Tensor]] | None = None
    """Fields of ``n`` blocks -> the low and high planes, float32 ``[n * block_size / (2 w), w]`` each."""
    plane_width: int = 0
    """``w``: values per half group of the planes."""

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]


def _f16(field: torch.Tensor) -> torch.Tensor:  # uint8 [n, 2] -> float32 [n, 1]
    return field.view(torch.float16).float()


def _nibbles(qs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [n, k] -> [n, 2k]: the low nibbles, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).to(dtype)


_BITS = torch.arange(8, dtype=torch.uint8)


def _low_bits(qh: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k] (a little-endian 8k-bit mask) -> uint8 [n, 8k]: bit j of the mask."""
    return ((qh.unsqueeze(-1) >> _BITS) & 1).view(qh.shape[0], -1)


def _q8_0(f: Fields) -> torch.Tensor:
    return f["qs"].view(torch.int8).float().mul_(_f16(f["d"]))


def _q4_0(f: Fields) -> torch.Tensor:
    return _nibbles(f["qs"]).sub_(8).mul_(_f16(f["d"]))


def _q4_1(f: Fields) -> torch.Tensor:
    return _nibbles(f["qs"]).mul_(_f16(f["d"])).add_(_f16(f["m"]))


def _five_bit(f: Fields) -> torch.Tensor:  # uint8 [n, 32], values 0..31
    return _nibbles(f["qs"], torch.uint8) | (_low_bits(f["qh"]) << 4)


def _q5_0(f: Fields) -> torch.Tensor:
    return _five_bit(f).float().sub_(16).mul_(_f16(f["d"]))


def _q5_1(f: Fields) -> torch.Tensor:
    return _five_bit(f).float().mul_(_f16(f["d"])).add_(_f16(f["m"]))


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes -> the eight 6-bit scales and mins (uint8 [n, 8] each)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _planes_32(f: Fields, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d * q (+ m)`` on both planes of 32-value blocks; ``low``/``high`` float32 [n, 16] (already ``q - 8`` or
    ``q - 16`` for the formats without ``m``)."""
    d = _f16(f["d"])
    low, high = low.mul_(d), high.mul_(d)
    if "m" in f:
        m = _f16(f["m"])
        low, high = low.add_(m), high.add_(m)
    return low, high


def _q4_planes(f: Fields) -> tuple[torch.Tensor, torch.Tensor]:
    qs, shift = f["qs"], 0 if "m" in f else 8
    low, high = (qs & 0x0F).float(), (qs >> 4).float()
    return _planes_32(f, low.sub_(shift) if shift else low, high.sub_(shift) if shift else high)


def _q5_planes(f: Fields) -> tuple[torch.Tensor, torch.Tensor]:
    qs, qh, shift = f["qs"], f["qh"], 0 if "m" in f else 16
    low = ((qs & 0x0F) | (_low_bits(qh[:, :2]) << 4)).float()
    high = ((qs >> 4) | (_low_bits(qh[:, 2:]) << 4)).float()
    return _planes_32(f, low.sub_(shift) if shift else low, high.sub_(shift) if shift else high)


def _k_apply(f: Fields, q: torch.Tensor) -> torch.Tensor:
    """``(d * sc) * q - dmin * mn`` per sub-block of 32; ``q`` float32 [n, 8, 32]."""
    sc, mn = _k_scales(f["scales"])
    scale = (_f16(f["d"]) * sc.float()).unsqueeze(-1)  # [n, 8, 1]
    offset = (_f16(f["dmin"]) * mn.float()).unsqueeze(-1)
    return q.mul_(scale).sub_(offset).view(q.shape[0], -1)


def _k_nibbles(qs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [n, 128] -> [n, 8, 32]: per 32 bytes, the low nibbles (one sub-block), then the high ones."""
    n = qs.shape[0]
    return _nibbles(qs.reshape(n * 4, 32), dtype).view(n, 8, 32)


def _q4_k(f: Fields) -> torch.Tensor:
    return _k_apply(f, _k_nibbles(f["qs"], torch.float32))


def _k_planes(f: Fields, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d * sc) * q - dmin * mn`` on both planes of K-quant blocks: sub-blocks 0, 2, 4, 6 are the low
    nibbles, 1, 3, 5, 7 the high ones; ``low``/``high`` float32 [n * 4, 32]."""
    sc, mn = _k_scales(f["scales"])
    scale = _f16(f["d"]) * sc.float()  # [n, 8]
    offset = _f16(f["dmin"]) * mn.float()
    low = low.mul_(scale[:, 0::2].reshape(-1, 1)).sub_(offset[:, 0::2].reshape(-1, 1))
    high = high.mul_(scale[:, 1::2].reshape(-1, 1)).sub_(offset[:, 1::2].reshape(-1, 1))
    return low, high


def _q4_k_planes(f: Fields) -> tuple[torch.Tensor, torch.Tensor]:
    qs = f["qs"].reshape(-1, 32)  # [n * 4, 32]
    return _k_planes(f, (qs & 0x0F).float(), (qs >> 4).float())


_EVEN_BITS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)


def _q5_k_planes(f: Fields) -> tuple[torch.Tensor, torch.Tensor]:
    qs, qh = f["qs"].reshape(-1, 32), f["qh"].view(-1, 1, 32)
    low_high_bit = ((qh >> _EVEN_BITS) & 1).reshape(-1, 32)  # sub-block 2g takes bit 2g
    high_high_bit = ((qh >> (_EVEN_BITS + 1)) & 1).reshape(-1, 32)
    low = ((qs & 0x0F) | (low_high_bit << 4)).float()
    high = ((qs >> 4) | (high_high_bit << 4)).float()
    return _k_planes(f, low, high)


def _q5_k(f: Fields) -> torch.Tensor:
    n = f["qs"].shape[0]
    high = (f["qh"].view(n, 1, 32) >> _BITS.view(1, 8, 1)) & 1  # [n, 8, 32]: sub-block i takes bit i
    q = _k_nibbles(f["qs"], torch.uint8) | (high << 4)
    return _k_apply(f, q.float())


_SIX_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)


def _q6_k(f: Fields) -> torch.Tensor:
    n = f["ql"].shape[0]
    low = _nibbles(f["ql"].reshape(n * 2, 64), torch.uint8).view(n, 8, 32)
    high = ((f["qh"].view(n, 2, 1, 32) >> _SIX_SHIFTS) & 3).view(n, 8, 32)
    q = (low | (high << 4)).view(torch.int8).float().sub_(32).view(n, 16, 16)
    scale = _f16(f["d"]) * f["scales"].view(torch.int8).float()  # [n, 16]
    return q.mul_(scale.unsqueeze(-1)).view(n, -1)


_K_HEAD = (("d", 2), ("dmin", 2), ("scales", 12))
FORMATS: dict[GGMLQuantizationType, BlockFormat] = {
    f.qtype: f
    for f in (
        BlockFormat(_Q.Q8_0, (("d", 2), ("qs", 32)), _q8_0),
        BlockFormat(_Q.Q4_0, (("d", 2), ("qs", 16)), _q4_0, _q4_planes, 16),
        BlockFormat(_Q.Q4_1, (("d", 2), ("m", 2), ("qs", 16)), _q4_1, _q4_planes, 16),
        BlockFormat(_Q.Q5_0, (("d", 2), ("qh", 4), ("qs", 16)), _q5_0, _q5_planes, 16),
        BlockFormat(_Q.Q5_1, (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)), _q5_1, _q5_planes, 16),
        BlockFormat(_Q.Q4_K, (*_K_HEAD, ("qs", 128)), _q4_k, _q4_k_planes, 32),
        BlockFormat(_Q.Q5_K, (*_K_HEAD, ("qh", 32), ("qs", 128)), _q5_k, _q5_k_planes, 32),
        BlockFormat(_Q.Q6_K, (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)), _q6_k),
    )
}
"""The block formats decoded here (kept quantized in memory); others are dequantized at load."""


def split_fields(blocks: torch.Tensor, fmt: BlockFormat) -> Fields:
    """uint8 ``[n, type_size]`` blocks -> each field's bytes, contiguous ``[n, field_bytes]``."""
    out, start = {}, 0
    for name, size in fmt.fields:
        out[name] = blocks[:, start : start + size].contiguous()
        start += size
    return out


def dequantize_blocks(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """uint8 ``[n, type_size]`` blocks of a format in :data:`FORMATS` -> float32 ``[n, block_size]``."""
    fmt = FORMATS[qtype]
    return fmt.decode(split_fields(blocks.reshape(-1, fmt.type_size), fmt))
