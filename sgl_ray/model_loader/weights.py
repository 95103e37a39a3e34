"""Streaming a model's weights as ``(hf_parameter_name, tensor)`` pairs, one tensor in memory at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from sgl_ray.errors import ModelLoadError
from sgl_ray.model_loader.gguf import iter_gguf_weights
from sgl_ray.model_loader.source import ModelSource


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every weight of ``source`` under its Hugging Face name, never the whole state dict at once.

    Safetensors tensors keep their stored dtype; GGUF tensors come out dequantized as float32. The caller casts and
    shards. Tied models yield no ``lm_head.weight``.

    >>> from sgl_ray.model_loader import default_model_path, resolve_model
    >>> weights = dict(iter_weights(resolve_model(str(default_model_path()))))
    >>> weights["model.layers.0.self_attn.k_proj.weight"].shape
    torch.Size([192, 576])
    """
    if source.format == "gguf":
        (gguf_file,) = source.weight_files
        yield from iter_gguf_weights(gguf_file)
    else:
        yield from iter_safetensors(source.weight_files)


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from safetensors files in order, reading each tensor only when it is reached.

    >>> import tempfile, safetensors.torch
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> safetensors.torch.save_file({"w": torch.ones(2)}, path)
    >>> [(name, t.tolist()) for name, t in iter_safetensors([path])]
    [('w', [1.0, 1.0])]
    """
    from safetensors import safe_open

    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as exc:  # truncated or corrupt file
            raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc


@torch.no_grad()
def fill_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights for benchmarks (``load_format="dummy"``): speed does not depend on the values; norms get 1
    so activations stay in range."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
