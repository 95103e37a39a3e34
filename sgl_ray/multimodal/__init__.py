"""Image inputs of vision-language models: loading and limits (:mod:`.inputs`), ``http(s)`` URLs (:mod:`.fetch`),
preprocessing on the caller's side (:mod:`.processor`), and the model runner's per-request image state and
embedding cache (:mod:`.runner`)."""

from __future__ import annotations

from sgl_ray.multimodal.inputs import ImageLimits, InvalidImageError, MultimodalInputs

__all__ = ["ImageLimits", "InvalidImageError", "MultimodalInputs"]
