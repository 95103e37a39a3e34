"""Finding a model's files and streaming its weights: local HF dirs, GGUF files, hub ids, the embedded default.

>>> from sgl_ray.model_loader import default_model_path, iter_weights, load_hf_config, resolve_model
>>> source = resolve_model(str(default_model_path()))
>>> load_hf_config(source).model_type
'llama'
>>> name, tensor = next(iter_weights(source))
"""

from __future__ import annotations

from sgl_ray.model_loader.default_model import (
    DEFAULT_MODEL,
    WheelModel,
    default_model_path,
    fetch_wheel_model,
)
from sgl_ray.model_loader.gguf import GGUF_ARCHS, convert_gguf_metadata, hf_tensor_name, iter_gguf_weights
from sgl_ray.model_loader.packaged_models import GEMMA3_270M, PackagedModel, packaged_model_path
from sgl_ray.model_loader.source import ModelSource, load_hf_config, load_tokenizer, resolve_model
from sgl_ray.model_loader.weights import WeightStream, iter_safetensors, iter_weights

__all__ = [
    "DEFAULT_MODEL",
    "GEMMA3_270M",
    "GGUF_ARCHS",
    "ModelSource",
    "PackagedModel",
    "WeightStream",
    "WheelModel",
    "convert_gguf_metadata",
    "default_model_path",
    "fetch_wheel_model",
    "hf_tensor_name",
    "iter_gguf_weights",
    "iter_safetensors",
    "iter_weights",
    "load_hf_config",
    "load_tokenizer",
    "packaged_model_path",
    "resolve_model",
]
