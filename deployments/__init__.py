"""Ray Serve and Ray Data: the OpenAI-compatible ingress, the LLM server deployment, cache-aware routing, app
builders, and the batch processor for Ray Data pipelines.

``build_openai_app`` is addressable from Serve YAML (``import_path: sgl_ray.deployments:build_openai_app``).
"""

from sgl_ray.deployments.app import build_openai_app
from sgl_ray.deployments.data import Processor, ProcessorConfig, build_processor
from sgl_ray.deployments.ingress import OpenAIIngress
from sgl_ray.deployments.llm_server import LLMServer
from sgl_ray.deployments.router import PrefixCacheRouter

__all__ = [
    "LLMServer",
    "OpenAIIngress",
    "PrefixCacheRouter",
    "Processor",
    "ProcessorConfig",
    "build_openai_app",
    "build_processor",
]
