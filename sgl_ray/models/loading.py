"""Maps checkpoint tensors onto a model's (possibly fused, possibly sharded) parameters."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from sgl_ray.errors import ModelLoadError
from sgl_ray.layers.quantization import QuantizedMatrix

logger = logging.getLogger(__name__)


def load_stacked_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params: Sequence[tuple[str, str, object]],
    skip_suffixes: Sequence[str] = (),
    remap: Callable[[str], tuple[str, object] | None] | None = None,
) -> None:
    """Load ``(hf_name, tensor)`` pairs one at a time.

    ``remap(name)``, when given and not None for a name, says its ``(parameter, shard_id)`` first (routed
    experts: ``sgl_ray.layers.moe.experts.expert_weight_target``). Otherwise ``stacked_params`` rows
    ``(fused_name, checkpoint_name, shard_id)`` route e.g. ``q_proj`` into ``qkv_proj`` with ``shard_id="q"``.
    Every parameter must be written at least once, or :class:`ModelLoadError` names the missing ones; unknown
    checkpoint tensors are skipped with a debug log. A quantized tensor (:class:`QuantizedMatrix`) reaches only a
    parameter marked ``accepts_quantized`` (linear layers, embeddings); any other is given its float values.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(name.endswith(s) for s in skip_suffixes):
            continue
        target, shard_id = name, None
        if remap is not None and (routed := remap(name)) is not None:
            target, shard_id = routed
        else:
            for fused, part, sid in stacked_params:
                if f".{part}." in name:
                    target, shard_id = name.replace(f".{part}.", f".{fused}."), sid
                    break
        param = params.get(target)
        if param is None:
            logger.debug("skipping checkpoint tensor %s (no matching parameter)", name)
            continue
        loader = getattr(param, "weight_loader", None)
        if isinstance(tensor, QuantizedMatrix) and not getattr(param, "accepts_quantized", False):
            tensor = tensor.dequantize()
        with torch.no_grad():
            if loader is None:
                if param.shape != tensor.shape:
                    raise ModelLoadError(
                        f"{name}: shape {tuple(tensor.shape)} != parameter {tuple(param.shape)}"
                    )
                param.data.copy_(tensor)
            else:
                loader(param, tensor, shard_id)
        loaded.add(target)
    tied = {n for n, p in params.items() if any(p is q for m, q in params.items() if m in loaded)}
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise ModelLoadError(
            f"checkpoint is missing weights: {missing[:8]}{' …' if len(missing) > 8 else ''}"
        )


def split_fused_projections(
    weights: Iterable[tuple[str, torch.Tensor]], q_size: int, kv_size: int
) -> Iterable[tuple[str, torch.Tensor]]:
    """Checkpoints that store q/k/v as one ``qkv_proj`` [q_size + 2 * kv_size, ...] (Phi-3) or gate/up as one
    ``gate_up_proj`` [2 * intermediate, ...] (Phi-3, GLM-4) → the separate ``q_proj``/``k_proj``/``v_proj`` and
    ``gate_proj``/``up_proj`` tensors (views), which the stacked parameters' loaders then cut per rank as usual
    (a rank's slice of a fused tensor is not a contiguous block of it)."""
    for name, tensor in weights:
        if ".qkv_proj." in name:
            parts = zip(("q_proj", "k_proj", "v_proj"), tensor.split([q_size, kv_size, kv_size]), strict=True)
            for part, piece in parts:
                yield name.replace(".qkv_proj.", f".{part}."), piece
        elif ".gate_up_proj." in name:
            gate, up = tensor.chunk(2, dim=0)
            yield name.replace(".gate_up_proj.", ".gate_proj."), gate
            yield name.replace(".gate_up_proj.", ".up_proj."), up
        else:
            yield name, tensor
