"""Dequantization of GGUF tensors for loading: the block formats that
:mod:`sgl_ray.layers.quantization.gguf_formats` decodes in torch (vectorised, bit-identical to the ``gguf``
package's numpy reference, which is several times slower); other formats go to the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as reference_dequantize

from sgl_ray.layers.quantization.gguf_formats import FORMATS, dequantize_blocks


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values of one tensor's raw data (``data``: the file's array, last dim in bytes for quantized
    types), shaped like the reference's result."""
    fmt = FORMATS.get(qtype)
    if fmt is None:
        return reference_dequantize(data, qtype)
    raw = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy: the file map is read-only
    values = dequantize_blocks(raw.reshape(-1, fmt.type_size), qtype)
    return values.numpy().reshape(*data.shape[:-1], data.shape[-1] // fmt.type_size * fmt.block_size)
