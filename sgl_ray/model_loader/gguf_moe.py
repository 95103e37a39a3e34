"""MoE GGUF files (llama.cpp's ``qwen2moe`` and ``qwen3moe``): stacked experts and the config transformers misses.

llama.cpp's converter stacks a layer's routed experts into one 3-D tensor per projection (``torch.stack`` of the
HF per-expert weights along a new first dimension), so in numpy order (reversed ggml dims)::

    blk.N.ffn_gate_exps / ffn_up_exps   [E, I, H]   expert e = HF experts.{e}.gate_proj / up_proj  [I, H]
    blk.N.ffn_down_exps                 [E, H, I]   expert e = HF experts.{e}.down_proj            [H, I]

Quantized blocks never cross a row (ggml rows are whole blocks), so expert ``e``'s rows ``data[e]`` dequantize on
their own, bit-identical to the same slice of the whole stack: each expert is dequantized alone, only if wanted,
and the others' bytes are never read. The router (``ffn_gate_inp``) and the shared expert are plain tensors; only
``ffn_gate_inp_shexp`` needs a reshape (files from older converters store it squeezed to ``[H]``, HF has ``[1, H]``).

transformers' GGUF config mapping for ``qwen2_moe``/``qwen3_moe`` drops ``expert_feed_forward_length`` and
``expert_shared_feed_forward_length`` (its config then holds the class defaults, right only for the flagship
checkpoints), so :func:`moe_config_fields` reads the sizes from the tensors themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sgl_ray.errors import UnsupportedModelError
from sgl_ray.model_loader.gguf_header import GGUFFile, GGUFTensor
from sgl_ray.model_loader.gguf_quants import dequantize

MOE_BLOCK_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
"""GGUF block tensors of the Qwen MoE families with one HF counterpart (``blk.N.<key>`` → ``model.layers.N.<value>``)."""

_STACK_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
_SHARED_GATE = ".mlp.shared_expert_gate.weight"


def is_expert_stack(gguf_name: str) -> bool:
    """Whether a GGUF tensor stacks a layer's routed experts (``blk.N.ffn_{gate,up,down}_exps.weight``)."""
    return _STACK_RE.fullmatch(gguf_name) is not None


def stacked_expert_name(gguf_name: str, expert: int) -> str | None:
    """The HF name of expert ``expert`` of a stacked-experts tensor, ``None`` if ``gguf_name`` is no such stack.

    >>> stacked_expert_name("blk.2.ffn_down_exps.weight", 5)
    'model.layers.2.mlp.experts.5.down_proj.weight'
    """
    if match := _STACK_RE.fullmatch(gguf_name):
        layer, part = match.groups()
        return f"model.layers.{layer}.mlp.experts.{expert}.{part}_proj.weight"
    return None


def iter_stacked_experts(
    tensor: GGUFTensor, wanted: Callable[[str], bool] | None
) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, float32 [rows, cols])`` for each expert of a stacked tensor that ``wanted`` accepts (all when
    ``wanted`` is None), dequantizing only those experts' rows, one expert at a time."""
    num_experts, rows, cols = (int(d) for d in reversed(tensor.shape))  # [E, I, H] or [E, H, I]
    for expert in range(num_experts):
        name = stacked_expert_name(tensor.name, expert)
        assert name is not None, tensor.name
        if wanted is not None and not wanted(name):
            continue
        # data[expert]: this expert's rows (whole quant blocks) of the read-only file map
        yield name, dequantize(tensor.data[expert], tensor.tensor_type).reshape(rows, cols)


def hf_shape(name: str, weight: np.ndarray) -> np.ndarray:
    """``weight`` in the shape HF gives parameter ``name`` where the GGUF shape differs (the shared-expert gate)."""
    return weight.reshape(1, -1) if name.endswith(_SHARED_GATE) else weight


def check_moe_layout(arch: str, reader: GGUFFile, path: str) -> None:
    """Reject MoE layouts this loader cannot map: llama.cpp files Mixtral as ``llama`` with ``llama.expert_count``,
    which transformers' GGUF support reads as a dense Llama (no MixtralConfig), so no HF config describes it."""
    if arch == "llama" and int(reader.fields.get("llama.expert_count", 0) or 0) > 0:
        raise UnsupportedModelError(
            f"{path!r} is a Mixtral-style MoE GGUF (architecture 'llama' with "
            f"{reader.fields['llama.expert_count']} experts); transformers' GGUF support has no Mixtral config "
            "for it, so it is not supported: load the safetensors checkpoint instead"
        )


def moe_config_fields(arch: str, reader: GGUFFile) -> dict[str, Any]:
    """HF config fields of a ``qwen2moe``/``qwen3moe`` file that transformers' GGUF conversion leaves at the class
    defaults: the experts' and shared expert's intermediate sizes (from the tensors' shapes), the dense layers
    (those without a router: ``mlp_only_layers``) and ``norm_topk_prob`` when the file says
    (``<arch>.expert_weights_norm``). Empty for other architectures."""
    if arch not in ("qwen2moe", "qwen3moe"):
        return {}
    num_layers = int(reader.fields[f"{arch}.block_count"])
    routed: set[int] = set()
    fields: dict[str, Any] = {"decoder_sparse_step": 1}
    for tensor in reader.tensors:
        layer, _, part = tensor.name.removeprefix("blk.").partition(".")
        if part == "ffn_gate_inp.weight":
            routed.add(int(layer))
        elif part == "ffn_gate_exps.weight":
            fields["moe_intermediate_size"] = int(tensor.shape[1])  # ggml (H, I, E)
        elif part == "ffn_gate_shexp.weight":
            fields["shared_expert_intermediate_size"] = int(tensor.shape[1])  # ggml (H, I_shared)
    if arch == "qwen2moe":
        fields.setdefault("shared_expert_intermediate_size", 0)
    fields["mlp_only_layers"] = [i for i in range(num_layers) if i not in routed]
    if (norm := reader.fields.get(f"{arch}.expert_weights_norm")) is not None:
        fields["norm_topk_prob"] = bool(norm)
    return fields
