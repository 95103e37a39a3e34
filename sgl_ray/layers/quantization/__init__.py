"""Weights held in a compact encoding and decoded inside the matmul (GGUF blocks today).

:class:`QuantizedMatrix` is the seam an encoding implements; :class:`QuantizedWeight` is what a linear layer or an
embedding holds in place of its dense weight once its checkpoint arrives quantized
(:func:`sgl_ray.layers.linear.linear` and the embedding recognise it).
"""

from sgl_ray.layers.quantization.base import DenseRows, QuantizedMatrix
from sgl_ray.layers.quantization.gguf import GGUFMatrix
from sgl_ray.layers.quantization.weight import QuantizedWeight, load_rows, narrow_columns, weight_nbytes

__all__ = [
    "DenseRows",
    "GGUFMatrix",
    "QuantizedMatrix",
    "QuantizedWeight",
    "load_rows",
    "narrow_columns",
    "weight_nbytes",
]
