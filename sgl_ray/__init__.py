"""sgl_ray: high-performance LLM serving on Ray.

Example::

    >>> import sgl_ray
    >>> llm = sgl_ray.Engine()  # default model: SmolLM2-135M-Instruct (fetched and cached on first use)
    >>> llm.generate("Hello", {"max_new_tokens": 8, "temperature": 0})["text"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Engine", "EngineArgs", "SamplingParams", "__version__", "function"]

if TYPE_CHECKING:
    from sgl_ray.configs.engine_args import EngineArgs
    from sgl_ray.entrypoints.engine import Engine
    from sgl_ray.lang import function
    from sgl_ray.sampling.params import SamplingParams


def __getattr__(name: str) -> Any:  # lazy, so `import sgl_ray` stays cheap
    if name == "Engine":
        from sgl_ray.entrypoints.engine import Engine

        return Engine
    if name == "EngineArgs":
        from sgl_ray.configs.engine_args import EngineArgs

        return EngineArgs
    if name == "SamplingParams":
        from sgl_ray.sampling.params import SamplingParams

        return SamplingParams
    if name == "function":  # @sgl_ray.function; the rest of the language is sgl_ray.lang
        from sgl_ray.lang import function

        return function
    raise AttributeError(name)
