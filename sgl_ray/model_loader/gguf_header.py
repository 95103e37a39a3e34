"""A GGUF file's metadata and tensor table, read straight from a memory map.

The ``gguf`` package's reader builds numpy views for every part of every metadata item; a tokenizer's ~100k
strings make that about 1.2 s for SmolLM2, paid again by every process that loads the weights. Here the header is
walked with ``struct`` (tens of milliseconds), and each tensor comes back as a read-only numpy view of the mapping
in the ``gguf`` package's layout (quantized types as ``uint8`` rows of blocks), which
:func:`~sgl_ray.model_loader.gguf_quants.dequantize` takes unchanged.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata count u64; metadata as
(key string, value type u32, value); tensor infos as (name string, n_dims u32, dims u64[n_dims], type u32, offset
u64); tensor data from the next multiple of ``general.alignment`` (default 32). A string is a u64 length and UTF-8
bytes; an array is an item type u32, a count u64 and the items.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_PLAIN = {  # tensor types stored as plain numpy items; the others are bytes of quantized blocks
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    data: np.ndarray  # read-only view: numpy order (reversed dims); quantized types as uint8 [..., row bytes]


class GGUFFile:
    """``fields``: every metadata value (strings as ``str``, arrays as lists); ``tensors`` in file order.

    >>> from sgl_ray.model_loader import default_model_path
    >>> f = GGUFFile(default_model_path())
    >>> f.fields["general.architecture"], f.tensors[0].name
    ('llama', 'token_embd.weight')
    """

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        m = self._map
        if len(m) < 24 or m[:4] != _MAGIC:
            raise GGUFFormatError(f"{str(path)!r} is not a GGUF file (no GGUF magic)")
        (version,) = struct.unpack_from("<I", m, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} of {str(path)!r} is not supported (2 and 3 are)")
        n_tensors, n_fields = struct.unpack_from("<QQ", m, 8)
        self._off = 24
        try:
            self.fields: dict[str, Any] = {}
            for _ in range(n_fields):
                key = self._string()
                (kind,) = self._unpack("<I")
                self.fields[key] = self._value(kind)
            infos = [self._tensor_info() for _ in range(n_tensors)]
        except (struct.error, UnicodeDecodeError, KeyError) as exc:
            raise GGUFFormatError(f"corrupt GGUF header in {str(path)!r}: {exc!r}") from None
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._off // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    # --- header walking --------------------------------------------------------------------------------------------
    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._map, self._off)
        self._off += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._map, self._off)
        start = self._off + 8
        self._off = start + n
        return self._map[start : start + n].decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<IQ")
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                values = np.frombuffer(self._map, dtype, count, self._off).tolist()
                self._off += count * dtype.itemsize
                return values
            return [self._value(item) for _ in range(count)]
        return self._unpack(_SCALARS[kind])[0]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{n_dims}Q")
        kind, offset = self._unpack("<IQ")
        return name, dims, GGMLQuantizationType(kind), offset

    def _tensor(self, start: int, name: str, dims: tuple[int, ...], kind: GGMLQuantizationType, offset: int):
        n_elems = int(np.prod(dims))
        np_dims = tuple(reversed(dims))
        plain = _PLAIN.get(kind)
        if plain is not None:
            data = np.frombuffer(self._map, plain, n_elems, start + offset)
        else:
            block, size = GGML_QUANT_SIZES[kind]
            data = np.frombuffer(self._map, np.uint8, n_elems * size // block, start + offset)
            np_dims = quant_shape_to_byte_shape(np_dims, kind)
        return GGUFTensor(name, kind, dims, data.reshape(np_dims))
