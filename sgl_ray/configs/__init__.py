"""Frozen configuration types."""

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig, resolve_dtype

__all__ = ["EngineArgs", "ModelConfig", "resolve_dtype"]
