"""Saved one-row GEMV launch shapes (``SGL_RAY_GEMV_CONFIGS``) reach every kernel's shape lookup."""

from __future__ import annotations

import json

import pytest

from sgl_ray.layers import gemv_overrides, triton_gemv
from sgl_ray.layers.quantization import triton_fp8, triton_int4


@pytest.fixture
def saved_file(tmp_path, monkeypatch):
    def write(best: dict) -> None:
        path = tmp_path / "gemv.json"
        path.write_text(gemv_overrides.dump(best))
        monkeypatch.setenv("SGL_RAY_GEMV_CONFIGS", str(path))
        gemv_overrides.load.cache_clear()

    yield write
    monkeypatch.delenv("SGL_RAY_GEMV_CONFIGS", raising=False)
    gemv_overrides.load.cache_clear()


def test_dump_parse_round_trip():
    best = {"fp8": {(6144, 4096): (2, 1024, 1, 4)}, "int4-fused": {(4096, 14336): (8, 1024, 4, 3)}}
    assert gemv_overrides.parse(json.loads(gemv_overrides.dump(best))) == best


@pytest.mark.parametrize(
    "data, match",
    [
        ({"bf16": {"1,2": [1, 2, 3, 4]}}, "unknown GEMV kind"),
        ({"fp8": {"1,2": [1, 2, 3]}}, "four to six integers"),
        ({"int4": {"1,2": [1, 0, 3, 4]}}, "four to six integers"),
        ({"int4": {"12": [1, 2, 3, 4]}}, ""),
    ],
)
def test_malformed_files_are_refused(data, match):
    with pytest.raises(ValueError, match=match):
        gemv_overrides.parse(data)


def test_saved_shapes_take_precedence(saved_file):
    n, k = 6144, 4096
    assert triton_fp8.gemv_config(n, k) == triton_fp8.DEFAULT_GEMV
    assert triton_int4.gemv_config(n, k) == triton_int4.DEFAULT_GEMV
    float_shape = triton_gemv.gemv_config(n, k)
    assert triton_gemv.gemv_config(n, k, "fp8") == float_shape
    saved_file(
        {
            "fp8": {(n, k): (8, 2048, 8, 3)},
            "int4": {(n, k): (16, 64, 4, 3)},
            "fp8-fused": {(n, k): (4, 256, 1, 4)},
            "int4-fused": {(n, k): (2, 256, 1, 4)},
        }
    )
    assert triton_fp8.gemv_config(n, k) == triton_fp8.Fp8GemvConfig(8, 2048, 8, 3)
    assert triton_int4.gemv_config(n, k) == triton_int4.Int4GemvConfig(16, 64, 4, 3)
    assert triton_gemv.gemv_config(n, k, "fp8") == triton_gemv.GemvConfig(4, 256, 1, 4)
    assert triton_gemv.gemv_config(n, k, "int4") == triton_gemv.GemvConfig(2, 256, 1, 4)
    # Float weights and other shapes keep the built-in choices.
    assert triton_gemv.gemv_config(n, k) == float_shape
    assert triton_fp8.gemv_config(4096, 4096) == triton_fp8.GEMV_TABLE.get(
        (4096, 4096), triton_fp8.DEFAULT_GEMV
    )
