"""Weights held in a compact encoding and decoded inside the matmul: GGUF blocks, INT4 groups (AWQ, GPTQ), FP8.

:class:`QuantizedMatrix` is the seam an encoding implements; :class:`QuantizedWeight` is what a linear layer or an
embedding holds in place of its dense weight once its checkpoint arrives quantized
(:func:`sgl_ray.layers.linear.linear` and the embedding recognise it). :mod:`.methods` says which encoding a
checkpoint (its ``quantization_config``) or the ``quantization`` option asks for.
"""

from sgl_ray.layers.quantization.base import DenseRows, QuantizedMatrix
from sgl_ray.layers.quantization.fp8 import Fp8Matrix
from sgl_ray.layers.quantization.gguf import GGUFMatrix
from sgl_ray.layers.quantization.int4 import AWQMatrix, GPTQMatrix, Int4Matrix
from sgl_ray.layers.quantization.methods import (
    QuantMethod,
    checkpoint_quant_method,
    create_quant_method,
)
from sgl_ray.layers.quantization.weight import QuantizedWeight, load_rows, narrow_columns, weight_nbytes

__all__ = [
    "AWQMatrix",
    "DenseRows",
    "Fp8Matrix",
    "GGUFMatrix",
    "GPTQMatrix",
    "Int4Matrix",
    "QuantMethod",
    "QuantizedMatrix",
    "QuantizedWeight",
    "checkpoint_quant_method",
    "create_quant_method",
    "load_rows",
    "narrow_columns",
    "weight_nbytes",
]
