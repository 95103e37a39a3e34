"""Streaming a model's weights as ``(hf_parameter_name, tensor)`` pairs, one tensor in memory at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from sgl_ray.errors import ModelLoadError
from sgl_ray.layers.quantization import QuantizedMatrix
from sgl_ray.model_loader.gguf import iter_gguf_weights
from sgl_ray.model_loader.source import ModelSource


class WeightStream:
    """The weights of ``source`` as an iterable of ``(name, tensor)`` (:func:`iter_weights` on each iteration);
    :meth:`only` narrows it to the names a shard reads, so the others are never read from disk, and
    :meth:`quantized` keeps a GGUF file's blocks quantized (``keep_quantized`` of :func:`iter_weights`).

    >>> from sgl_ray.model_loader import default_model_path, resolve_model
    >>> stream = WeightStream(resolve_model(str(default_model_path())))
    >>> [name for name, _ in stream.only(lambda n: n.endswith("layers.0.input_layernorm.weight"))]
    ['model.layers.0.input_layernorm.weight']
    """

    def __init__(
        self, source: ModelSource, wanted: Callable[[str], bool] | None = None, keep_quantized: bool = False
    ) -> None:
        self.source = source
        self.wanted = wanted
        self.keep_quantized = keep_quantized

    def only(self, wanted: Callable[[str], bool]) -> WeightStream:
        return WeightStream(self.source, wanted, self.keep_quantized)

    def quantized(self, keep: bool = True) -> WeightStream:
        return WeightStream(self.source, self.wanted, keep)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | QuantizedMatrix]]:
        return iter_weights(self.source, self.wanted, self.keep_quantized)


def iter_weights(
    source: ModelSource, wanted: Callable[[str], bool] | None = None, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantizedMatrix]]:
    """Yield every weight of ``source`` under its Hugging Face name (those ``wanted`` accepts, when given, the
    others not even read), never the whole state dict at once.

    Safetensors tensors keep their stored dtype; GGUF tensors come out dequantized as float32, or with
    ``keep_quantized`` as :class:`~sgl_ray.layers.quantization.QuantizedMatrix` blocks where their format allows.
    The caller casts and shards. Tied models yield no ``lm_head.weight``.

    >>> from sgl_ray.model_loader import default_model_path, resolve_model
    >>> weights = dict(iter_weights(resolve_model(str(default_model_path()))))
    >>> weights["model.layers.0.self_attn.k_proj.weight"].shape
    torch.Size([192, 576])
    """
    if source.format == "gguf":
        (gguf_file,) = source.weight_files
        yield from iter_gguf_weights(gguf_file, wanted, keep_quantized)
    else:
        yield from iter_safetensors(source.weight_files, wanted)


def iter_safetensors(
    files: Iterable[Path], wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from safetensors files in order, reading each tensor only when it is reached.

    >>> import tempfile, safetensors.torch
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> safetensors.torch.save_file({"w": torch.ones(2)}, path)
    >>> [(name, t.tolist()) for name, t in iter_safetensors([path])]
    [('w', [1.0, 1.0])]
    """
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    if wanted is None or wanted(name):
                        yield name, handle.get_tensor(name)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # truncated or corrupt file
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
