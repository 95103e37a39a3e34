"""Every environment variable sgl_ray reads, in one place (prefix ``SGL_RAY_``).

Read them through :func:`get_env` at the edge (CLI, engine construction); the core receives plain config values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sgl_ray"


@dataclass(frozen=True)
class Env:
    """A snapshot of the ``SGL_RAY_*`` environment."""

    cache_dir: Path
    """Where downloaded/converted models live (``SGL_RAY_CACHE_DIR``, default ``~/.cache/sgl_ray``)."""
    default_model: str | None
    """Overrides the default model path used when none is given (``SGL_RAY_DEFAULT_MODEL``)."""
    log_level: str
    """Logging level of the ``sgl_ray`` logger (``SGL_RAY_LOG_LEVEL``, default ``WARNING``)."""
    gemv_configs: Path | None = None
    """A JSON file of one-row GEMV launch shapes measured on this card (``SGL_RAY_GEMV_CONFIGS``), written by
    ``sgl-ray bench quant-kernels --tune --save FILE``; its entries take precedence over the built-in tables."""


def get_env() -> Env:
    """Read the environment now (not at import time, so tests can change it)."""
    return Env(
        cache_dir=Path(os.environ.get("SGL_RAY_CACHE_DIR") or _cache_home()),
        default_model=os.environ.get("SGL_RAY_DEFAULT_MODEL") or None,
        log_level=os.environ.get("SGL_RAY_LOG_LEVEL", "WARNING").upper(),
        gemv_configs=Path(os.environ["SGL_RAY_GEMV_CONFIGS"])
        if os.environ.get("SGL_RAY_GEMV_CONFIGS")
        else None,
    )
