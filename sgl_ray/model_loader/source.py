"""Resolving a model path (local HF dir, GGUF file, hub id) to files on disk, and loading its config and tokenizer."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sgl_ray.envs import get_env
from sgl_ray.errors import ModelLoadError
from sgl_ray.model_loader.gguf import GGUF_SUFFIX, convert_gguf_metadata

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
"""Hub files a tokenizer needs: tokenizer.json/_config.json, sentencepiece/tiktoken models, merges/vocab, chat templates."""
MODEL_PATTERNS = ["*.json", "*.safetensors", *TOKENIZER_PATTERNS]
"""Hub files :func:`resolve_model` downloads: configs, the index, the weights and the tokenizer."""
_HUB_IGNORE_PATTERNS = [
    "consolidated*"
]  # Mistral repos ship their weights twice; the HF-named copy is enough
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, once resolved.

    ``local_dir`` always holds ``config.json`` and the tokenizer files; for a GGUF model it is the converted cache
    directory and ``weight_files`` is the ``.gguf`` file itself.
    """

    model_path: str
    """The path or hub id as the user gave it."""
    local_dir: Path
    weight_files: tuple[Path, ...]
    format: Literal["safetensors", "gguf"]


def resolve_model(model_path: str, revision: str | None = None, weights: bool = True) -> ModelSource:
    """Resolve a local HF directory, a ``.gguf`` file (or a dir holding exactly one) or a hub id ``org/name``.

    Hub ids are downloaded with ``huggingface_hub.snapshot_download`` (configs, safetensors, tokenizer files only);
    ``revision`` applies to them alone. With ``weights=False`` (random weights) a directory needs only its
    config. Raises :class:`ModelLoadError` naming the path and what was looked for.

    >>> from sgl_ray.model_loader import default_model_path
    >>> source = resolve_model(str(default_model_path()))
    >>> source.format, (source.local_dir / "config.json").is_file()
    ('gguf', True)
    """
    path = Path(model_path).expanduser()
    if path.is_file():
        if path.suffix != GGUF_SUFFIX:
            raise ModelLoadError(f"model path {model_path!r} is a file but not a {GGUF_SUFFIX} file")
        return _gguf_source(model_path, path)
    if path.is_dir():
        if not weights and (path / CONFIG_FILE).is_file():
            return ModelSource(model_path, path.resolve(), (), "safetensors")
        return _dir_source(model_path, path)
    if _HUB_ID_RE.fullmatch(model_path) and not model_path.endswith(GGUF_SUFFIX):
        return _dir_source(model_path, _download(model_path, revision, MODEL_PATTERNS))
    raise ModelLoadError(
        f"model path {model_path!r} does not exist: expected a directory with {CONFIG_FILE} and safetensors "
        f"weights, a {GGUF_SUFFIX} file, or a hub id of the form 'org/name'"
    )


def _gguf_source(model_path: str, gguf_file: Path) -> ModelSource:
    local_dir = convert_gguf_metadata(gguf_file.resolve(), get_env().cache_dir)
    return ModelSource(model_path, local_dir, (gguf_file.resolve(),), "gguf")


def _dir_source(model_path: str, directory: Path) -> ModelSource:
    directory = directory.resolve()
    if not (directory / CONFIG_FILE).is_file():
        ggufs = sorted(directory.glob(f"*{GGUF_SUFFIX}"))
        if len(ggufs) == 1:
            return _gguf_source(model_path, ggufs[0])
        found = (
            f"{len(ggufs)} {GGUF_SUFFIX} files ({', '.join(p.name for p in ggufs)})" if ggufs else "neither"
        )
        raise ModelLoadError(
            f"model directory {model_path!r} ({directory}) has no {CONFIG_FILE} and not exactly one "
            f"{GGUF_SUFFIX} file: found {found}"
        )
    return ModelSource(model_path, directory, _safetensors_files(model_path, directory), "safetensors")


def _safetensors_files(model_path: str, directory: Path) -> tuple[Path, ...]:
    index = directory / SAFETENSORS_INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read {index}: {exc}") from exc
        files = tuple(directory / name for name in sorted(set(weight_map.values())))
        if missing := [f.name for f in files if not f.is_file()]:
            raise ModelLoadError(f"model {model_path!r}: shards named in {index.name} are missing: {missing}")
        return files
    if (directory / SAFETENSORS_FILE).is_file():
        return (directory / SAFETENSORS_FILE,)
    other = sorted(p.name for p in directory.glob("*.bin")) or sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {other}; only safetensors weights are supported)" if other else ""
    raise ModelLoadError(
        f"model directory {model_path!r} ({directory}) has {CONFIG_FILE} but neither {SAFETENSORS_FILE} nor "
        f"{SAFETENSORS_INDEX_FILE}{hint}"
    )


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=allow_patterns,
                ignore_patterns=_HUB_IGNORE_PATTERNS,
            )
        )
    except Exception as exc:  # offline, unknown repo/revision, gated, HTTP errors: all mean "could not fetch"
        at = f" at revision {revision!r}" if revision else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"model path {repo_id!r} is not a local path and downloading it from the model hub{at} failed: "
            f"{type(exc).__name__}: {reason}"
        ) from exc


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    """The model's ``transformers`` config, read from ``source.local_dir``.

    >>> from sgl_ray.model_loader import default_model_path
    >>> config = load_hf_config(resolve_model(str(default_model_path())))
    >>> config.architectures, config.tie_word_embeddings
    (['LlamaForCausalLM'], True)
    """
    from transformers import AutoConfig

    from sgl_ray.multimodal.config import language_model_config

    try:  # a vision-language config: its language model's, with the vision parts attached
        return language_model_config(AutoConfig.from_pretrained(source.local_dir))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the config of {source.model_path!r} from {source.local_dir}: {exc}"
        ) from exc


def load_tokenizer(source: ModelSource, tokenizer_path: str | None = None) -> PreTrainedTokenizerBase:
    """The fast tokenizer (with its chat template) of ``source``, or of ``tokenizer_path`` when given.

    ``tokenizer_path`` may be a directory with tokenizer files, a ``.gguf`` file or a hub id (only tokenizer files
    are downloaded then). A tokenizer without a chat template gets the engine's built-in one for the model's type,
    where there is one (Gemma: :mod:`sgl_ray.tokenizer.chat_templates`).

    >>> from sgl_ray.model_loader import default_model_path
    >>> tokenizer = load_tokenizer(resolve_model(str(default_model_path())))
    >>> tokenizer.decode(tokenizer("Hello world")["input_ids"])
    'Hello world'
    """
    from transformers import AutoTokenizer

    from sgl_ray.tokenizer.chat_templates import ensure_chat_template

    name = source.model_path if tokenizer_path is None else tokenizer_path
    directory = source.local_dir if tokenizer_path is None else _tokenizer_dir(tokenizer_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, use_fast=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r} from {directory}: {exc}") from exc
    return ensure_chat_template(tokenizer, _model_type(source.local_dir))


def _model_type(directory: Path) -> str | None:
    """``model_type`` of the ``config.json`` in ``directory`` (None where it cannot be read)."""
    try:
        return json.loads((directory / CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _tokenizer_dir(tokenizer_path: str) -> Path:
    path = Path(tokenizer_path).expanduser()
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and any(path.glob(f"*{GGUF_SUFFIX}")):
        return resolve_model(tokenizer_path).local_dir
    if path.is_dir():
        return path
    if path.is_file():
        return resolve_model(tokenizer_path).local_dir
    if _HUB_ID_RE.fullmatch(tokenizer_path):
        return _download(tokenizer_path, None, ["*.json", *TOKENIZER_PATTERNS])
    raise ModelLoadError(
        f"tokenizer path {tokenizer_path!r} does not exist: expected a directory with tokenizer files, "
        f"a {GGUF_SUFFIX} file, or a hub id of the form 'org/name'"
    )
