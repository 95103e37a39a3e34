"""Per-layer FP8 KV-cache scales read from a checkpoint.

Checkpoints calibrated for an FP8 KV cache store, per attention layer, a scalar scale for the keys and one for the
values (a stored value ``s`` means ``s * scale``). Their names differ by the tool that wrote them; these are read
(``N`` is the decoder layer's index):

* ``model.layers.N.self_attn.k_scale`` and ``.v_scale``: llm-compressor / compressed-tensors (``kv_cache_scheme``);
* ``...self_attn.attn.k_scale`` and ``.v_scale``: vLLM's parameter names, in re-exported checkpoints;
* ``...self_attn.k_proj.k_scale`` and ``...v_proj.v_scale``: NVIDIA ModelOpt;
* ``...self_attn.k_proj.output_scale`` and ``...v_proj.output_scale``: older compressed-tensors, AMD Quark;
* ``...self_attn.kv_scale``: a deprecated single scale for both K and V.

:class:`CheckpointKVScales` takes them out of the weight stream while the model loads (the model has no parameter
for them) and answers :class:`~sgl_ray.mem_cache.kv_pool.KVScale` s per layer: 1.0 where the checkpoint has none.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from sgl_ray.errors import ModelLoadError
from sgl_ray.mem_cache.kv_pool import KVScale

logger = logging.getLogger(__name__)

T = TypeVar("T")

# layer index, then which scale: k_scale / v_scale / kv_scale leaves, or the K/V projections' output scales
_SCALE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?(?:(k|v|kv)_scale|(k|v)_proj\.output_scale)$")


def kv_scale_of(name: str) -> tuple[int, str] | None:
    """``(layer, "k" | "v" | "kv")`` when ``name`` is a KV-cache scale of a checkpoint, else None.

    >>> kv_scale_of("model.layers.3.self_attn.k_proj.output_scale"), kv_scale_of("model.layers.3.mlp.weight")
    ((3, 'k'), None)
    """
    match = _SCALE_NAME.search(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) or match.group(3)


class CheckpointKVScales:
    """The KV-cache scales of a checkpoint, filled by iterating :meth:`collect`'s stream.

    >>> scales = CheckpointKVScales()
    >>> weights = [("model.layers.0.self_attn.k_scale", torch.tensor(0.5)), ("model.norm.weight", torch.ones(2))]
    >>> [name for name, _ in scales.collect(weights)]
    ['model.norm.weight']
    >>> scales.for_layers(range(2))
    [KVScale(k=0.5, v=1.0), KVScale(k=1.0, v=1.0)]
    """

    def __init__(self) -> None:
        self.k: dict[int, float] = {}  # layer -> scale
        self.v: dict[int, float] = {}

    def __bool__(self) -> bool:
        return bool(self.k or self.v)

    def collect(self, weights: Iterable[tuple[str, T]]) -> Iterator[tuple[str, T]]:
        """``weights`` without its KV-cache scales, which are recorded here as they pass."""
        for name, tensor in weights:
            found = kv_scale_of(name) if isinstance(tensor, torch.Tensor) else None
            if found is None:
                yield name, tensor
                continue
            layer, which = found
            value = _scalar(name, tensor)
            if which in ("k", "kv"):
                self.k[layer] = value
            if which in ("v", "kv"):
                self.v[layer] = value

    def for_layers(self, layers: Iterable[int]) -> list[KVScale]:
        """The scales of decoder layers ``layers`` (global indices), 1.0 where the checkpoint has none."""
        return [KVScale(self.k.get(i, 1.0), self.v.get(i, 1.0)) for i in layers]


def _scalar(name: str, tensor: torch.Tensor) -> float:
    """A scale tensor's value: a scalar (or one value); several (per head) are taken at their largest, which
    keeps every head's values within the format's range."""
    if tensor.numel() == 0:
        raise ModelLoadError(f"{name}: an empty KV-cache scale", param="kv_cache_dtype")
    values = tensor.detach().float()
    if tensor.numel() > 1:
        logger.warning("%s: %d KV-cache scales, using their largest for the layer", name, tensor.numel())
    value = float(values.max())
    if not (math.isfinite(value) and value > 0):
        raise ModelLoadError(
            f"{name}: KV-cache scale {value} (must be positive and finite)", param="kv_cache_dtype"
        )
    return value
