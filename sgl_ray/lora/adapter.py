"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``, a pickle,
only where allowed: see :func:`check_adapter`). A file that does not load is an :class:`InvalidRequestError`.

An adapter adds ``scaling * B @ A`` to the weight of each target projection, ``A: [r, in]``, ``B: [out, r]``,
``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Target modules here: ``q_proj k_proj v_proj o_proj
gate_proj up_proj down_proj`` of every decoder layer. On a vision-language model that is its language model's
decoder (``model.language_model.layers.*`` and the other checkpoint layouts); tensors on the vision tower or the
projector are refused (their modules take no LoRA here, so the adapter could not run as trained).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.errors import InvalidRequestError

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TENSOR_NAME = re.compile(r"layers\.(\d+)\..*?\.?(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")
# the image side of a vision-language model (Qwen2-VL's ``visual``; LLaVA's and Gemma 3's ``vision_tower`` and
# ``multi_modal_projector``): names of modules there that LoRA does not reach
_VISION_MODULES = frozenset({"visual", "vision_tower", "vision_model", "multi_modal_projector"})
# where a target-module regex is tried: a decoder layer's module in a text model's and in VLM checkpoints' layouts
_DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


@dataclass(frozen=True)
class AdapterConfig:
    """What the engine needs from ``adapter_config.json``."""

    path: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _bad(path: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"LoRA adapter {path!r}: {msg}", param="lora_path")


def read_adapter_config(path: str) -> AdapterConfig:
    """Read and check a PEFT adapter directory. Raises :class:`InvalidRequestError` for anything unusable.

    Example::

        >>> read_adapter_config("/adapters/sql").rank  # doctest: +SKIP
        16
    """
    directory = Path(path)
    cfg_file = directory / "adapter_config.json"
    if not cfg_file.is_file():
        raise _bad(path, "no adapter_config.json there (a local PEFT adapter directory is expected)")
    if not _weights_file(directory):
        raise _bad(path, "no adapter_model.safetensors (or adapter_model.bin) there")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise _bad(path, f"adapter_config.json is unreadable: {e}") from None
    if not isinstance(raw, dict):
        raise _bad(path, "adapter_config.json must hold a JSON object")
    try:
        return _config(path, directory, raw)
    except InvalidRequestError:
        raise
    except (TypeError, ValueError, re.error) as e:  # a value of the wrong type ("r": "eight"), a bad regex
        raise _bad(path, f"adapter_config.json has a bad value: {e}") from None


def _config(path: str, directory: Path, raw: dict) -> AdapterConfig:
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise _bad(path, f"peft_type {raw.get('peft_type')!r} is not LORA")
    if raw.get("target_parameters"):  # peft's LoRA on parameters: an MoE layer's fused experts
        raise _bad(
            path,
            f"target_parameters={raw['target_parameters']!r}: LoRA on the experts of an MoE layer is not "
            "supported (adapters may target the attention projections and the dense layers' MLPs)",
        )
    for key, ok in (
        ("use_dora", not raw.get("use_dora")),
        ("bias", raw.get("bias", "none") == "none"),
        ("modules_to_save", not raw.get("modules_to_save")),
        ("fan_in_fan_out", not raw.get("fan_in_fan_out")),
        ("rank_pattern", not raw.get("rank_pattern")),
        ("alpha_pattern", not raw.get("alpha_pattern")),
    ):
        if not ok:
            raise _bad(path, f"{key}={raw.get(key)!r} is not supported")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):  # a regex: resolve against the module names we know
        targets = [m for m in TARGET_MODULES if any(re.search(targets, n) for n in _decoder_names(m))]
    unknown = sorted(set(targets) - set(TARGET_MODULES))
    if unknown:
        raise _bad(path, f"target modules {unknown} are not supported (only {list(TARGET_MODULES)})")
    rank = int(raw.get("r", 8))
    if rank < 1:
        raise _bad(path, f"rank r={rank} must be >= 1")
    return AdapterConfig(
        path=str(directory),
        rank=rank,
        alpha=float(raw.get("lora_alpha", rank)),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=tuple(m for m in TARGET_MODULES if m in targets),
    )


def _decoder_names(module: str) -> list[str]:
    part = "self_attn" if module in TARGET_MODULES[:4] else "mlp"
    return [f"{prefix}layers.0.{part}.{module}" for prefix in _DECODER_PREFIXES]


def _weights_file(directory: Path) -> Path | None:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_adapter_weights(config: AdapterConfig) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """``{(layer, module): (A [r, in], B [out, r] * scaling)}`` on the CPU, in float32."""
    file = _weights_file(Path(config.path))
    if file is None:
        raise _bad(config.path, "no adapter_model.safetensors (or adapter_model.bin) there")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(file))
        else:
            tensors = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # whatever a file that does not load raises, the file is at fault: a 400
        raise _bad(config.path, f"{file.name} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise _bad(config.path, f"{file.name} does not map tensor names to tensors")
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if _VISION_MODULES.intersection(name.split(".")):
            raise _bad(
                config.path,
                f"tensor {name!r} is on the vision tower or projector: LoRA applies to the language model's "
                "decoder only (leave the vision modules out of target_modules, e.g. "
                "target_modules=r'.*language_model.*\\.(q_proj|v_proj)')",
            )
        m = _TENSOR_NAME.search(name)
        if m is None:
            raise _bad(config.path, f"unexpected tensor {name!r}")
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t.float()
    out = {}
    for key, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise _bad(config.path, f"layer {key[0]} {key[1]} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise _bad(config.path, f"layer {key[0]} {key[1]}: lora_A and lora_B must be matrices")
        if a.shape[0] != config.rank or b.shape[1] != config.rank:
            raise _bad(
                config.path, f"layer {key[0]} {key[1]}: rank {a.shape[0]} differs from r={config.rank}"
            )
        out[key] = (a, b * config.scaling)
    return out


def parse_lora_paths(entries: tuple[str, ...] | list[str] | dict[str, str] | None) -> dict[str, str]:
    """``["name=path", "path"]`` (a bare path is named after its directory) or ``{name: path}`` → ``{name: path}``.

    >>> parse_lora_paths(["sql=/a/sql", "/b/chat/"])
    {'sql': '/a/sql', 'chat': '/b/chat'}
    """
    if not entries:
        return {}
    if isinstance(entries, dict):
        return {k: str(Path(v)) for k, v in entries.items()}
    out = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = Path(entry.rstrip("/")).name, entry
        if not name or not path:
            raise InvalidRequestError(f"lora_paths entry {entry!r} must be name=path", param="lora_paths")
        out[name] = str(Path(path))
    return out


DEFAULT_MAX_RANK = 16


def resolve_max_rank(max_lora_rank: int | None, lora_paths) -> int:
    """``max_lora_rank`` if set, else the largest rank among the start-up adapters (16 without any)."""
    if max_lora_rank:
        return max_lora_rank
    ranks = [read_adapter_config(p).rank for p in parse_lora_paths(lora_paths).values()]
    return max(ranks, default=DEFAULT_MAX_RANK)


def check_adapter(path: str, hf_config, max_rank: int, *, allow_pickle: bool = False) -> AdapterConfig:
    """Everything a runner would trip over, checked before an adapter is accepted: format, rank, and that each
    tensor fits the model (layer index, ``in``/``out`` sizes of its projection).

    Weights in a pickle (``adapter_model.bin``) are refused unless ``allow_pickle`` (engine option
    ``lora_allow_pickle``): unpickling a file runs what its writer chose, and ``torch.load(weights_only=True)``
    narrows that without making pickles a format for files from strangers. Safetensors holds only tensors."""
    config = read_adapter_config(path)
    weights = _weights_file(Path(config.path))
    if weights is not None and weights.suffix == ".bin" and not allow_pickle:
        raise _bad(
            path,
            "adapter_model.bin is a pickle, which this server does not load: save the adapter as "
            "adapter_model.safetensors, or start the server with --lora-allow-pickle",
        )
    if config.rank > max_rank:
        raise _bad(path, f"rank {config.rank} exceeds max_lora_rank={max_rank}")
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    inter = hf_config.intermediate_size
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    moe = ModelConfig(hf_config, torch.float32)  # which layers are sparse (MoE models)
    for (layer, module), (a, b) in load_adapter_weights(config).items():
        if (
            module in ("gate_proj", "up_proj", "down_proj")
            and layer < moe.num_layers
            and moe.is_sparse_layer(layer)
        ):
            raise _bad(
                path,
                f"layer {layer} {module}: LoRA on the experts of an MoE layer is not supported "
                "(adapters may target the attention projections and the dense layers' MLPs)",
            )
        fan_in, fan_out = shapes[module]
        if layer >= hf_config.num_hidden_layers or a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise _bad(
                path,
                f"layer {layer} {module} (A {tuple(a.shape)}, B {tuple(b.shape)}) does not fit this model",
            )
    return config
