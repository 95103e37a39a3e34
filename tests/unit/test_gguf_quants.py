"""The torch dequantization of GGUF blocks equals the ``gguf`` package's numpy reference bit for bit: on every
tensor of the default model (Q4_1, Q8_0, F32) and on random blocks of each format handled here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as reference

from sgl_ray.model_loader.gguf import _reader
from sgl_ray.model_loader.gguf_quants import dequantize


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype == np.float32
        and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


def test_default_model_tensors_bit_identical(smollm2_path: str) -> None:
    reader = _reader(Path(smollm2_path))
    kinds = set()
    for tensor in reader.tensors:
        kinds.add(tensor.tensor_type)
        assert _same(
            dequantize(tensor.data, tensor.tensor_type), reference(tensor.data, tensor.tensor_type)
        ), tensor.name
    assert {GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0} <= kinds


@pytest.mark.parametrize("qtype,block_bytes,scales", [("Q4_0", 18, 1), ("Q4_1", 20, 2), ("Q8_0", 34, 1)])
def test_random_blocks_bit_identical(qtype: str, block_bytes: int, scales: int) -> None:
    rng = np.random.default_rng(0)
    rows, blocks_per_row = 6, 5
    data = rng.integers(0, 256, size=(rows, blocks_per_row, block_bytes), dtype=np.uint8)
    half = rng.normal(0, 0.05, size=(rows, blocks_per_row, scales)).astype(np.float16)  # finite scales
    data[..., : 2 * scales] = half.view(np.uint8).reshape(rows, blocks_per_row, 2 * scales)
    data = data.reshape(rows, blocks_per_row * block_bytes)
    kind = GGMLQuantizationType[qtype]
    out = dequantize(data, kind)
    assert out.shape == (rows, blocks_per_row * 32)
    assert _same(out, reference(data, kind))
