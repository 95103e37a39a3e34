"""A quantized safetensors checkpoint's tensors, grouped per layer into one weight each.

An AWQ layer stores ``prefix.qweight``, ``prefix.qzeros`` and ``prefix.scales``, an FP8 one ``prefix.weight`` and
``prefix.weight_scale``…; the model's loaders take one ``prefix.weight``. :func:`quantized_weights` holds a layer's
parts until its method has them all (they are neighbours in a file's sorted names; a sharded checkpoint may split
them over two files), then yields ``(prefix.weight, QuantizedMatrix)`` — or its float values when the method
dequantizes at load. Everything else passes through unchanged, in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from sgl_ray.errors import ModelLoadError
from sgl_ray.layers.quantization.base import QuantizedMatrix
from sgl_ray.layers.quantization.methods import QuantMethod

Named = tuple[str, torch.Tensor | QuantizedMatrix]


def quantized_weights(
    weights: Iterable[Named], method: QuantMethod, float_layers: Sequence[str] = ()
) -> Iterator[Named]:
    """``weights`` with each quantized layer's parts replaced by its ``prefix.weight`` (see the module docstring);
    a layer whose name ends with one of ``float_layers`` (a model's ``float_layers``: MLA's ``kv_b_proj``, applied
    absorbed) gets its float values.

    >>> from sgl_ray.layers.quantization.methods import FP8CheckpointMethod
    >>> w = torch.ones(2, 4).to(torch.float8_e4m3fn)
    >>> parts = [("l.bias", torch.zeros(2)), ("l.weight", w), ("l.weight_scale", torch.tensor(0.5))]
    >>> [(n, type(t).__name__) for n, t in quantized_weights(parts, FP8CheckpointMethod(None))]
    [('l.bias', 'Tensor'), ('l.weight', 'Fp8Matrix')]
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    built: set[str] = set()
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        if not isinstance(tensor, torch.Tensor) or not method.is_part(leaf, tensor):
            yield name, tensor
            continue
        if prefix in built:
            method.late_part(name, tensor)
            continue
        parts = pending.setdefault(prefix, {})
        parts[leaf] = tensor
        if method.complete(parts):
            del pending[prefix]
            built.add(prefix)
            try:
                matrix = method.build(prefix, parts)
            except (ModelLoadError, ValueError) as exc:
                raise ModelLoadError(f"{prefix}: {exc}") from exc
            keep = method.keep and not prefix.endswith(tuple(float_layers))
            yield f"{prefix}.weight", matrix if keep else matrix.dequantize()
    incomplete = {p: parts for p, parts in pending.items() if not parts.keys() <= method.optional}
    if incomplete:
        prefix, parts = next(iter(incomplete.items()))
        more = f" (and {len(incomplete) - 1} more incomplete layers)" if len(incomplete) > 1 else ""
        raise ModelLoadError(method.incomplete(prefix, parts) + more, param="quantization")
