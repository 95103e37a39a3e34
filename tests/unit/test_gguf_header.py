"""The GGUF header reader against the ``gguf`` package's own reader: every metadata value and every tensor (name,
type, shape, bytes) of the default model and of a file written with all value kinds; bad files give typed errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from sgl_ray.errors import ModelLoadError
from sgl_ray.model_loader.gguf import _reader
from sgl_ray.model_loader.gguf_header import GGUFFile, GGUFFormatError


def _assert_same(path: Path) -> GGUFFile:
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    ref_fields = {
        k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")
    }  # GGUF.*: header
    assert ours.fields == ref_fields
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name
        assert not a.data.flags.writeable
    return ours


def test_default_model_header_and_tensors_equal_gguf_reader(smollm2_path: str) -> None:
    ours = _assert_same(Path(smollm2_path))
    assert len(ours.fields["tokenizer.ggml.tokens"]) > 40_000  # the big string arrays are read too
    assert {t.tensor_type for t in ours.tensors} >= {
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.F32,
    }


def test_every_value_kind_and_plain_tensor_types(tmp_path: Path) -> None:
    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("k.u8", 200)
    w.add_int8("k.i8", -5)
    w.add_uint16("k.u16", 60000)
    w.add_int16("k.i16", -300)
    w.add_uint32("k.u32", 4_000_000_000)
    w.add_int32("k.i32", -70_000)
    w.add_uint64("k.u64", 2**40)
    w.add_int64("k.i64", -(2**40))
    w.add_float32("k.f32", 0.25)
    w.add_float64("k.f64", 1e-300)
    w.add_bool("k.bool", True)
    w.add_string("k.str", "héllo ✓")
    w.add_array("k.ints", [1, 2, 3])
    w.add_array("k.floats", [0.5, -1.5])
    w.add_array("k.strs", ["a", "", "ünï"])
    w.add_array("k.empty", [])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.normal(size=(3, 5)).astype(np.float32))
    w.add_tensor("b.weight", rng.normal(size=(7,)).astype(np.float16))
    w.add_tensor("c.weight", rng.integers(-9, 9, size=(2, 2, 3)).astype(np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = _assert_same(path)
    assert ours.fields["k.str"] == "héllo ✓" and ours.fields["k.strs"] == ["a", "", "ünï"]
    assert ours.fields["general.alignment"] == 64


def test_bad_files_raise_typed_errors(tmp_path: Path, smollm2_path: str) -> None:
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(GGUFFormatError, match="no GGUF magic"):
        GGUFFile(not_gguf)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):  # what the loader raises
        _reader(not_gguf)
    head = Path(smollm2_path).read_bytes()[:4096]  # cut inside the tokenizer's strings
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(head)
    with pytest.raises(GGUFFormatError, match="corrupt GGUF header"):
        GGUFFile(truncated)
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(GGUFFormatError, match="version 1"):
        GGUFFile(v1)
