"""Backends that run ``sgl_ray.lang`` programs (see :class:`~sgl_ray.lang.backends.base.Backend`)."""

from __future__ import annotations

from sgl_ray.lang.backends.base import Backend, GenResult, Prompt, TokenScoringBackend
from sgl_ray.lang.backends.engine_backend import EngineBackend
from sgl_ray.lang.backends.openai_backend import OpenAI
from sgl_ray.lang.backends.runtime_endpoint import RuntimeEndpoint

__all__ = [
    "Backend",
    "EngineBackend",
    "GenResult",
    "OpenAI",
    "Prompt",
    "RuntimeEndpoint",
    "TokenScoringBackend",
]
