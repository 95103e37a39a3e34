"""Ray Serve and Ray Data: the OpenAI-compatible ingress, the LLM server deployment, cache-aware routing, app
builders, and the batch processor for Ray Data pipelines.

``build_openai_app`` is addressable from Serve YAML (``import_path: sgl_ray.deployments:build_openai_app``); the
app's handle (``serve.get_app_handle(name)``) has ``chat``, ``completions``, ``responses`` and ``generate``
methods that raise :class:`APIError` for a refused request.
The names below load on first use, so a process that needs one small module (a Serve replica of the LoRA
registry, say) does not import the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sgl_ray.deployments.app import build_openai_app
    from sgl_ray.deployments.data import Processor, ProcessorConfig, build_processor
    from sgl_ray.deployments.ingress import OpenAIIngress
    from sgl_ray.deployments.llm_server import LLMServer
    from sgl_ray.deployments.router import PrefixCacheRouter
    from sgl_ray.protocol.api_error import APIError

_EXPORTS = {
    "APIError": "sgl_ray.protocol.api_error",
    "LLMServer": "llm_server",
    "OpenAIIngress": "ingress",
    "PrefixCacheRouter": "router",
    "Processor": "data",
    "ProcessorConfig": "data",
    "build_openai_app": "app",
    "build_processor": "data",
}

__all__ = [
    "APIError",
    "LLMServer",
    "OpenAIIngress",
    "PrefixCacheRouter",
    "Processor",
    "ProcessorConfig",
    "build_openai_app",
    "build_processor",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sgl_ray.deployments' has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(
        importlib.import_module(module if "." in module else f"sgl_ray.deployments.{module}"), name
    )
