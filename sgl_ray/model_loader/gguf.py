"""GGUF checkpoints: tensor names and layouts mapped to Hugging Face ones, metadata converted once to a cache dir.

A GGUF file carries everything (hyper-parameters, tokenizer, quantized tensors) in llama.cpp's own vocabulary. The
engine works in Hugging Face terms, so this module

* streams tensors out of the file, dequantized to float32 (or, with ``keep_quantized``, as
  :class:`~sgl_ray.layers.quantization.GGUFMatrix` blocks) and renamed (``blk.3.attn_q.weight`` →
  ``model.layers.3.self_attn.q_proj.weight``), undoing the Q/K row permutation llama.cpp applies to llama models
  (Mixtral included) and the 1 it adds to Gemma's norm weights (:mod:`~sgl_ray.model_loader.gguf_gemma`), and
  splitting MoE files' stacked experts into HF's per-expert tensors (:mod:`~sgl_ray.model_loader.gguf_moe`);
* converts the metadata once into a directory with ``config.json``, tokenizer files and ``generation_config.json``
  under ``<cache_dir>/gguf/<stem>-<key>``, because transformers' GGUF tokenizer conversion takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch

from sgl_ray.errors import ModelLoadError, UnsupportedModelError
from sgl_ray.layers.quantization import GGUFMatrix
from sgl_ray.layers.quantization.gguf_formats import FORMATS
from sgl_ray.model_loader.gguf_gemma import GEMMA_BLOCK_NAMES, NORM_OFFSET, gemma_config_fields
from sgl_ray.model_loader.gguf_header import GGUFFile
from sgl_ray.model_loader.gguf_moe import (
    MIXTRAL_NAMES,
    QWEN_MOE_NAMES,
    SHARED_EXPERT_NAMES,
    MoENames,
    check_moe_layout,
    hf_shape,
    is_expert_stack,
    is_mixtral,
    iter_stacked_experts,
    mixtral_config,
    moe_config_fields,
    moe_tensor_name,
)
from sgl_ray.model_loader.gguf_quants import dequantize

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GGUF_SUFFIX = ".gguf"
_CONVERSION_VERSION = 1
"""Bump when the converted directory's layout changes, so stale cache entries are not reused."""


@dataclass(frozen=True)
class GGUFArch:
    """How one ``general.architecture`` value maps onto a Hugging Face model."""

    permute_qk: bool
    """llama.cpp's converter reorders Q/K rows (interleaved rotary pairs) for this family; undo it on load."""
    moe_names: MoENames = QWEN_MOE_NAMES
    """The HF names of the router and routed experts, for files with experts."""
    block_names: dict[str, str] = field(default_factory=dict)
    """Block tensors named otherwise than in Llama (``blk.N.<key>`` → ``model.layers.N.<value>``)."""
    norm_offset: float = 0.0
    """What llama.cpp's converter added to the family's norm weights (``*norm.weight``); taken off on load."""


GGUF_ARCHS: dict[str, GGUFArch] = {
    # also Mistral and SmolLM, and Mixtral (with llama.expert_count > 0), which llama.cpp files as "llama"
    "llama": GGUFArch(permute_qk=True, moe_names=MIXTRAL_NAMES),
    "qwen2": GGUFArch(permute_qk=False),
    "qwen3": GGUFArch(permute_qk=False),
    # llama.cpp's converter permutes Q/K for llama only; the Qwen MoE families keep HF's row order, like qwen2/qwen3
    "qwen2moe": GGUFArch(permute_qk=False),
    "qwen3moe": GGUFArch(permute_qk=False),
    "gemma2": GGUFArch(permute_qk=False, block_names=GEMMA_BLOCK_NAMES, norm_offset=NORM_OFFSET),
    "gemma3": GGUFArch(permute_qk=False, block_names=GEMMA_BLOCK_NAMES, norm_offset=NORM_OFFSET),
}
"""GGUF architectures whose tensors :func:`iter_gguf_weights` can map."""

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    **SHARED_EXPERT_NAMES,
}
_IGNORED = {
    "rope_freqs"
}  # llama3 rope factors precomputed by llama.cpp; the config's rope parameters carry them
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str, expert: int | None = None, arch: str = "llama") -> str | None:
    """The Hugging Face parameter name of a GGUF tensor of a file of architecture ``arch``, ``None`` for tensors
    with no HF counterpart.

    A stacked-experts tensor (``blk.N.ffn_{gate,up,down}_exps``) holds all routed experts of a layer, each one HF
    tensor: ``expert`` picks which name. The router's and experts' names depend on the family: ``llama`` files
    with experts are Mixtral.

    >>> hf_tensor_name("blk.7.ffn_down.weight")
    'model.layers.7.mlp.down_proj.weight'
    >>> hf_tensor_name("token_embd.weight")
    'model.embed_tokens.weight'
    >>> hf_tensor_name("blk.1.ffn_gate_exps.weight", expert=3, arch="qwen3moe")
    'model.layers.1.mlp.experts.3.gate_proj.weight'
    >>> hf_tensor_name("blk.1.ffn_gate_exps.weight", expert=3)
    'model.layers.1.block_sparse_moe.experts.3.w1.weight'
    >>> hf_tensor_name("blk.2.ffn_norm.weight", arch="gemma3")
    'model.layers.2.pre_feedforward_layernorm.weight'
    """
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {sorted(GGUF_ARCHS)})"
        )
    if (name := moe_tensor_name(gguf_name, GGUF_ARCHS[arch].moe_names, expert)) is not None:
        return name
    if match := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        block_names = {**_BLOCK_NAMES, **GGUF_ARCHS[arch].block_names}
        if part in block_names:
            return f"model.layers.{layer}.{block_names[part]}.{kind}"
    elif match := _GLOBAL_RE.fullmatch(gguf_name):
        base, kind = match.groups()
        if base in _IGNORED:
            return None
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no known Hugging Face name")


def _reader(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {str(path)!r}: {exc}") from exc


def gguf_architecture(path: Path, reader: GGUFFile | None = None) -> str:
    """The file's ``general.architecture``, checked against :data:`GGUF_ARCHS`.

    Raises :class:`UnsupportedModelError` for architectures this loader cannot map.
    """
    reader = reader or _reader(path)
    arch = reader.fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} of {str(path)!r} is not supported (supported: {sorted(GGUF_ARCHS)})"
        )
    check_moe_layout(arch, reader, str(path))
    return arch


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp stores each head's rows as [pairs, 2] where HF stores [2, pairs] (rotate-half layout):
    # [num_heads * head_dim, ...] -> [num_heads, head_dim/2, 2, ...] -> swap -> [num_heads, 2, head_dim/2, ...]
    rows = weight.shape[0]
    split = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def iter_gguf_weights(
    path: Path, wanted: Callable[[str], bool] | None = None, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFMatrix]]:
    """Yield ``(hf_name, float32 tensor)`` for every tensor of a GGUF file (those whose name ``wanted`` accepts,
    when given; the others are not dequantized), one dequantized tensor at a time.

    With ``keep_quantized``, a 2-D tensor of a block format that :data:`~sgl_ray.layers.quantization.gguf_formats.
    FORMATS` decodes comes as a :class:`GGUFMatrix` of its blocks instead (rows permuted like the float tensor's);
    routed experts, 1-D tensors and other formats still come dequantized.

    A stacked-experts tensor yields one tensor per expert under HF's per-expert names, in expert order;
    ``wanted`` is asked per expert, and only the wanted experts' rows are dequantized (an expert-parallel shard
    never reads the others'). Tied models have no ``output`` tensor, so no ``lm_head.weight`` is yielded for them.

    >>> from sgl_ray.model_loader import default_model_path
    >>> name, tensor = next(iter_gguf_weights(default_model_path()))
    >>> name, tensor.dtype
    ('model.embed_tokens.weight', torch.float32)
    """
    reader = _reader(path)
    arch = gguf_architecture(path, reader)
    num_heads = int(reader.fields[f"{arch}.attention.head_count"])
    num_kv_heads = int(reader.fields.get(f"{arch}.attention.head_count_kv", num_heads))
    for tensor in reader.tensors:
        if is_expert_stack(tensor.name):
            for name, weight in iter_stacked_experts(tensor, GGUF_ARCHS[arch].moe_names, wanted):
                yield name, _to_torch(weight)
            continue
        name = hf_tensor_name(tensor.name, arch=arch)
        if name is None or (wanted is not None and not wanted(name)):
            continue
        blocks = keep_quantized and tensor.tensor_type in FORMATS and len(tensor.shape) == 2
        if blocks:  # uint8 [rows, row bytes]: rows are whole blocks, so they permute like float rows
            weight = tensor.data
        else:
            weight = dequantize(tensor.data, tensor.tensor_type)  # numpy order: reversed ggml dims
            weight = weight.reshape([int(d) for d in reversed(tensor.shape)])
        if GGUF_ARCHS[arch].permute_qk and ".self_attn.q_proj." in name:
            weight = _unpermute(weight, num_heads)
        elif GGUF_ARCHS[arch].permute_qk and ".self_attn.k_proj." in name:
            weight = _unpermute(weight, num_kv_heads)
        elif GGUF_ARCHS[arch].norm_offset and tensor.name.endswith("norm.weight"):
            weight = weight - np.float32(GGUF_ARCHS[arch].norm_offset)  # float32, as transformers subtracts
        if blocks:
            yield name, GGUFMatrix.from_blocks(torch.from_numpy(np.array(weight)), tensor.tensor_type)
        else:
            yield name, _to_torch(hf_shape(name, weight))


def _to_torch(weight: np.ndarray) -> torch.Tensor:
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if not weight.flags.writeable:
        weight = weight.copy()  # a view into the read-only memory map (unquantized tensors)
    return torch.from_numpy(weight)


def _gguf_dtype(reader: GGUFFile) -> str:
    # Quantized files dequantize to float32 values; F16/BF16 files say what they were trained/exported in.
    file_type = reader.fields.get("general.file_type")
    return {gguf.LlamaFileType.MOSTLY_F16: "float16", gguf.LlamaFileType.MOSTLY_BF16: "bfloat16"}.get(
        file_type, "float32"
    )


def converted_dir_for(path: Path, cache_dir: Path) -> Path:
    """Where :func:`convert_gguf_metadata` puts (or put) the converted files of ``path``.

    The key hashes the file's size and mtime (not its content: GGUFs can be many GB) plus the transformers version
    and the conversion format, so a changed file or a new converter gets a fresh directory.
    """
    import transformers

    stat = path.stat()
    raw = f"{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}:{_CONVERSION_VERSION}"
    return cache_dir / "gguf" / f"{path.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def convert_gguf_metadata(path: Path, cache_dir: Path) -> Path:
    """Return a directory with ``config.json``, tokenizer files and ``generation_config.json`` for a GGUF file.

    The first call converts through transformers' GGUF support (seconds); later calls return the cached directory
    at once. The directory appears atomically (built in a temp dir, then renamed), so concurrent callers in several
    processes never see a half-written one.

    >>> from sgl_ray.envs import get_env
    >>> from sgl_ray.model_loader import default_model_path
    >>> (convert_gguf_metadata(default_model_path(), get_env().cache_dir) / "config.json").is_file()
    True
    """
    target = converted_dir_for(path, cache_dir)
    if (target / "config.json").is_file():
        return target
    reader = _reader(path)
    arch = gguf_architecture(path, reader)  # fail before the slow conversion
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_hf_files(path, staging, reader, arch)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another process: theirs is as good
                raise
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot convert GGUF metadata of {str(path)!r}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _hf_config(path: Path, reader: GGUFFile, arch: str) -> PretrainedConfig:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if is_mixtral(arch, reader):  # transformers would read it as a dense Llama
        return AutoConfig.for_model(**mixtral_config(reader))
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"GGUF model type {config.model_type!r} of {str(path)!r} is not a causal LM"
        )
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.update(moe_config_fields(arch, reader))
    config.update(gemma_config_fields(arch, reader, config))
    return config


def _write_hf_files(path: Path, out_dir: Path, reader: GGUFFile, arch: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    config = _hf_config(path, reader, arch)
    config.dtype = _gguf_dtype(reader)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(out_dir)
