"""Dequantization of the common GGUF block formats in torch (vectorized over all cores), bit-identical to the
``gguf`` package's numpy reference, which is several times slower; other formats go to the reference.

Blocks of 32 values, with ``d`` (and ``m``) as float16 scales::

    Q8_0: d | 32 x int8 q                          value = q * d
    Q4_0: d | 16 bytes, low nibbles then high      value = d * (nibble - 8)
    Q4_1: d | m | 16 bytes, as Q4_0                value = d * nibble + m
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as reference_dequantize

_Q = GGMLQuantizationType
_BLOCK_BYTES = {_Q.Q8_0: 34, _Q.Q4_0: 18, _Q.Q4_1: 20}  # each holds 32 values


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values of one tensor's raw data (``data``: the file's array, last dim in bytes for quantized
    types), shaped like the reference's result."""
    size = _BLOCK_BYTES.get(qtype)
    if size is None:
        return reference_dequantize(data, qtype)
    raw = torch.from_numpy(
        np.array(data, dtype=np.uint8).reshape(-1, size)
    )  # a copy: the file map is read-only
    d = raw[:, :2].contiguous().view(torch.float16).float()  # [blocks, 1]
    if qtype == _Q.Q8_0:
        values = raw[:, 2:].contiguous().view(torch.int8).float() * d
    else:
        packed = raw[:, 2:] if qtype == _Q.Q4_0 else raw[:, 4:]
        nibbles = torch.cat([packed & 0x0F, packed >> 4], dim=1)  # [blocks, 32]
        if qtype == _Q.Q4_0:
            values = d * (nibbles.to(torch.int8) - 8).float()
        else:
            m = raw[:, 2:4].contiguous().view(torch.float16).float()
            values = d * nibbles.float() + m
    return values.numpy().reshape(*data.shape[:-1], data.shape[-1] // size * 32)
