"""MoE GGUF files: llama.cpp's ``qwen2moe``/``qwen3moe``, and Mixtral, which llama.cpp files as ``llama``.

llama.cpp's converter stacks a layer's routed experts into one 3-D tensor per projection (``torch.stack`` of the
HF per-expert weights along a new first dimension), so in numpy order (reversed ggml dims)::

    blk.N.ffn_gate_exps / ffn_up_exps   [E, I, H]   expert e = HF gate / up projection of expert e   [I, H]
    blk.N.ffn_down_exps                 [E, H, I]   expert e = HF down projection of expert e        [H, I]
    blk.N.ffn_gate_inp                  [E, H]      the router                                       [E, H]

The HF names depend on the family (:class:`MoENames`): Qwen ``mlp.experts.{e}.gate_proj|up_proj|down_proj`` and
``mlp.gate``; Mixtral ``block_sparse_moe.experts.{e}.w1|w3|w2`` (gate, up, down) and ``block_sparse_moe.gate``.
Mixtral files converted before llama.cpp stacked experts (spring 2024) hold one 2-D tensor per expert,
``blk.N.ffn_{gate,up,down}.{e}.weight``, in the same per-expert orientation; they map one to one.

Quantized blocks never cross a row (ggml rows are whole blocks), so expert ``e``'s rows ``data[e]`` dequantize on
their own, bit-identical to the same slice of the whole stack: each expert is dequantized alone, only if wanted,
and the others' bytes are never read. The shared expert (``*_shexp``) is plain tensors; only
``ffn_gate_inp_shexp`` needs a reshape (files from older converters store it squeezed to ``[H]``, HF has ``[1, H]``).

Configs: transformers' GGUF mapping for ``qwen2_moe``/``qwen3_moe`` drops the experts' sizes (its config then holds
the class defaults, right only for the flagship checkpoints), so :func:`moe_config_fields` reads them from the
tensors; for a ``llama`` file with experts it builds a dense ``LlamaConfig``, so :func:`mixtral_config` builds the
``MixtralConfig`` from the ``llama.*`` metadata instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgl_ray.errors import UnsupportedModelError
from sgl_ray.model_loader.gguf_header import GGUFFile, GGUFTensor
from sgl_ray.model_loader.gguf_quants import dequantize

SHARED_EXPERT_NAMES = {
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
"""Qwen2-MoE's shared-expert block tensors (``blk.N.<key>`` → ``model.layers.N.<value>``)."""

_PARTS = ("gate", "up", "down")
_STACK_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
# early Mixtral files: one tensor per expert
_SPLIT_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")
_ROUTER_RE = re.compile(r"blk\.(\d+)\.ffn_gate_inp\.weight")
_SHARED_GATE = ".mlp.shared_expert_gate.weight"


@dataclass(frozen=True)
class MoENames:
    """How one family's HF checkpoints name the MoE block of layer N: the router ``model.layers.N.<block>.gate``
    and expert e's projections ``model.layers.N.<block>.experts.e.<projection>``.

    >>> MIXTRAL_NAMES.expert(3, 5, "down")
    'model.layers.3.block_sparse_moe.experts.5.w2.weight'
    """

    block: str
    projections: tuple[str, str, str]
    """HF names of llama.cpp's gate, up and down projections."""

    def router(self, layer: int | str) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert(self, layer: int | str, expert: int, part: str) -> str:
        projection = self.projections[_PARTS.index(part)]
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{projection}.weight"


QWEN_MOE_NAMES = MoENames("mlp", ("gate_proj", "up_proj", "down_proj"))
MIXTRAL_NAMES = MoENames("block_sparse_moe", ("w1", "w3", "w2"))


def is_expert_stack(gguf_name: str) -> bool:
    """Whether a GGUF tensor stacks a layer's routed experts (``blk.N.ffn_{gate,up,down}_exps.weight``)."""
    return _STACK_RE.fullmatch(gguf_name) is not None


def moe_tensor_name(gguf_name: str, names: MoENames, expert: int | None = None) -> str | None:
    """The HF name of a router or routed-expert tensor under ``names``, ``None`` for any other tensor; a stack
    holds every expert of its layer, so ``expert`` picks one (a ``ValueError`` without it).

    >>> moe_tensor_name("blk.2.ffn_down_exps.weight", QWEN_MOE_NAMES, expert=5)
    'model.layers.2.mlp.experts.5.down_proj.weight'
    >>> moe_tensor_name("blk.0.ffn_up.7.weight", MIXTRAL_NAMES)
    'model.layers.0.block_sparse_moe.experts.7.w3.weight'
    """
    if match := _STACK_RE.fullmatch(gguf_name):
        if expert is None:
            raise ValueError(f"GGUF tensor {gguf_name!r} stacks one tensor per expert: pass expert=")
        return names.expert(match[1], expert, match[2])
    if match := _SPLIT_RE.fullmatch(gguf_name):
        return names.expert(match[1], int(match[3]), match[2])
    if match := _ROUTER_RE.fullmatch(gguf_name):
        return names.router(match[1])
    return None


def iter_stacked_experts(
    tensor: GGUFTensor, names: MoENames, wanted: Callable[[str], bool] | None
) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, float32 [rows, cols])`` for each expert of a stacked tensor that ``wanted`` accepts (all when
    ``wanted`` is None), dequantizing only those experts' rows, one expert at a time."""
    num_experts, rows, cols = (int(d) for d in reversed(tensor.shape))  # [E, I, H] or [E, H, I]
    for expert in range(num_experts):
        name = moe_tensor_name(tensor.name, names, expert)
        assert name is not None, tensor.name
        if wanted is not None and not wanted(name):
            continue
        # data[expert]: this expert's rows (whole quant blocks) of the read-only file map
        yield name, dequantize(tensor.data[expert], tensor.tensor_type).reshape(rows, cols)


def hf_shape(name: str, weight: np.ndarray) -> np.ndarray:
    """``weight`` in the shape HF gives parameter ``name`` where the GGUF shape differs (the shared-expert gate)."""
    return weight.reshape(1, -1) if name.endswith(_SHARED_GATE) else weight


def is_mixtral(arch: str, reader: GGUFFile) -> bool:
    """Whether the file is Mixtral-style: llama.cpp files Mixtral as ``llama`` with ``llama.expert_count > 0``."""
    return arch == "llama" and int(reader.fields.get("llama.expert_count", 0) or 0) > 0


def _routed_layers(reader: GGUFFile) -> set[int]:
    return {int(m[1]) for tensor in reader.tensors if (m := _ROUTER_RE.fullmatch(tensor.name))}


def check_moe_layout(arch: str, reader: GGUFFile, path: str) -> None:
    """Reject MoE layouts this loader cannot map: a Mixtral-style file with dense layers (layers without a
    router), which ``MixtralForCausalLM`` (experts in every layer) has no place for."""
    if not is_mixtral(arch, reader):
        return
    num_layers = int(reader.fields["llama.block_count"])
    if dense := sorted(set(range(num_layers)) - _routed_layers(reader)):
        raise UnsupportedModelError(
            f"{path!r} is a Mixtral-style MoE GGUF (architecture 'llama' with "
            f"{reader.fields['llama.expert_count']} experts) whose layers {dense} have no router "
            "(blk.N.ffn_gate_inp); Mixtral has experts in every layer, so this layout is not supported"
        )


def mixtral_config(reader: GGUFFile) -> dict[str, Any]:
    """``MixtralConfig`` fields (``model_type`` and ``architectures`` included) of a Mixtral-style ``llama`` file,
    from the ``llama.*`` keys llama.cpp's converter writes, with llama.cpp's defaults for keys it may omit.

    The vocabulary size is ``llama.vocab_size`` or else the token list's length (llama.cpp's own order);
    ``llama.feed_forward_length`` is the experts' intermediate size (Mixtral's ``intermediate_size``).
    """
    fields = reader.fields

    def key(name: str, default: Any = None) -> Any:
        value = fields.get(f"llama.{name}", default)
        if value is None:
            raise UnsupportedModelError(f"Mixtral-style GGUF without 'llama.{name}'")
        return value

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    head_dim = fields.get("llama.attention.key_length") or fields.get("llama.rope.dimension_count")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    scaling = fields.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling != "none":
        raise UnsupportedModelError(f"Mixtral-style GGUF with rope scaling {scaling!r} is not supported")
    vocab_size = fields.get("llama.vocab_size") or len(fields.get("tokenizer.ggml.tokens", ()))
    return {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": int(head_dim or hidden // num_heads),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope,
        "num_local_experts": int(key("expert_count")),
        "num_experts_per_tok": int(key("expert_used_count")),
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": fields.get("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": all(tensor.name != "output.weight" for tensor in reader.tensors),
    }


def moe_config_fields(arch: str, reader: GGUFFile) -> dict[str, Any]:
    """HF config fields of a ``qwen2moe``/``qwen3moe`` file that transformers' GGUF conversion leaves at the class
    defaults: the experts' and shared expert's intermediate sizes (from the tensors' shapes), the dense layers
    (those without a router: ``mlp_only_layers``) and ``norm_topk_prob`` when the file says
    (``<arch>.expert_weights_norm``). Empty for other architectures."""
    if arch not in ("qwen2moe", "qwen3moe"):
        return {}
    num_layers = int(reader.fields[f"{arch}.block_count"])
    fields: dict[str, Any] = {"decoder_sparse_step": 1}
    for tensor in reader.tensors:
        part = tensor.name.removeprefix("blk.").partition(".")[2]
        if part == "ffn_gate_exps.weight":
            fields["moe_intermediate_size"] = int(tensor.shape[1])  # ggml (H, I, E)
        elif part == "ffn_gate_shexp.weight":
            fields["shared_expert_intermediate_size"] = int(tensor.shape[1])  # ggml (H, I_shared)
    if arch == "qwen2moe":
        fields.setdefault("shared_expert_intermediate_size", 0)
    routed = _routed_layers(reader)
    fields["mlp_only_layers"] = [i for i in range(num_layers) if i not in routed]
    if (norm := reader.fields.get(f"{arch}.expert_weights_norm")) is not None:
        fields["norm_topk_prob"] = bool(norm)
    return fields
