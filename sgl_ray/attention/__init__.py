"""Attention backends, chosen by name through a lazy registry."""

from __future__ import annotations

import importlib

import torch

from sgl_ray.attention.base import AttentionBackend
from sgl_ray.errors import InvalidRequestError

_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("sgl_ray.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("sgl_ray.attention.triton_backend", "TritonAttentionBackend"),
    "flashinfer": ("sgl_ray.attention.flashinfer_backend", "FlashInferAttentionBackend"),  # optional package
}
# The same backends with multi-head latent attention besides (sgl_ray.attention.mla), for MLA models.
_MLA_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("sgl_ray.attention.mla.torch_backend", "TorchMLABackend"),
    "triton": ("sgl_ray.attention.mla.triton_backend", "TritonMLABackend"),
}


def default_backend_name(device: torch.device) -> str:
    return "triton" if torch.device(device).type == "cuda" else "torch"


def backend_class(name: str, mla: bool = False) -> type[AttentionBackend]:
    """The class registered as ``name`` (imported now; its ``supports_*`` flags say what it implements)."""
    registry = _MLA_BACKENDS if mla else _BACKENDS
    if name not in registry:
        raise InvalidRequestError(
            f"attention_backend: unknown backend {name!r}{' for MLA models' if mla else ''} "
            f"(have: {sorted(registry)})",
            param="attention_backend",
        )
    module, cls = registry[name]
    return getattr(importlib.import_module(module), cls)


def create_attention_backend(
    name: str | None, device: torch.device, num_kv_splits: int | None = None, mla: bool = False
) -> AttentionBackend:
    """Instantiate the backend registered as ``name`` (``None``: the device's default). ``num_kv_splits`` fixes
    the Triton backend's decode split count (``None``: its own choice); no other backend takes it. ``mla``: the
    model's layers use multi-head latent attention, so the backend must have it too."""
    name = name or default_backend_name(device)
    backend_cls = backend_class(name, mla)
    if num_kv_splits is None:
        return backend_cls(device)
    if name != "triton":
        raise InvalidRequestError(
            f"triton_attention_num_kv_splits: applies to the triton attention backend, not {name!r}",
            param="triton_attention_num_kv_splits",
        )
    return backend_cls(device, num_kv_splits=num_kv_splits)


__all__ = ["AttentionBackend", "backend_class", "create_attention_backend", "default_backend_name"]
