"""MoE GGUF files (llama.cpp's ``qwen2moe``/``qwen3moe``, and Mixtral as ``llama`` with experts) written here the way
llama.cpp's converter writes them, from the tiny random-weight models of ``tests/moe_models.py``: every tensor maps
to its HF name, the stacked experts (and the per-expert tensors of early Mixtral files) split into exactly the
original per-expert weights, llama's Q/K permutation is undone, an expert-parallel filter reads only its experts'
rows, the converted config keeps the MoE sizes, and the engine on the ``.gguf`` gives transformers' greedy tokens on
the original safetensors."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize
from safetensors.torch import load_file
from transformers import AutoConfig

import sgl_ray
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.model_loader import (
    GGUF_ARCHS,
    gguf_moe,
    hf_tensor_name,
    iter_gguf_weights,
    load_hf_config,
    resolve_model,
)
from sgl_ray.model_loader.gguf_header import GGUFFile

_Q8 = gguf.GGMLQuantizationType.Q8_0
_EXPERT = re.compile(
    r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight"
)
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
NEW = 8
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


def write_moe_gguf(
    model_dir: str,
    arch: str,
    path: Path,
    tokenizer_gguf: str,
    quantize_experts: bool = False,
    split_experts: bool = False,
) -> dict[str, np.ndarray]:
    """A GGUF of the model in ``model_dir`` with the metadata llama.cpp's converter writes for ``arch`` (its
    ``TextModel``, ``LlamaModel`` and ``Qwen2MoeModel.set_gguf_parameters``), SmolLM2's tokenizer metadata, and
    the tensors: experts stacked ``[E, rows, cols]`` per projection (Q8_0 when ``quantize_experts``), or one tensor
    per expert ``blk.N.ffn_{gate,up,down}.E`` with no ``llama.vocab_size`` when ``split_experts`` (early Mixtral
    files); llama's Q/K rows permuted (``LlamaModel.permute``); ``ffn_gate_inp_shexp`` squeezed to ``[H]`` as
    older converters wrote it. Returns the tensors as stored (quantized ones as their dequantized values), by GGUF
    name."""
    config = AutoConfig.from_pretrained(model_dir)
    mixtral = config.model_type == "mixtral"
    state = load_file(Path(model_dir) / "model.safetensors")  # transformers saves per-expert names
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if not split_experts:
        writer.add_vocab_size(config.vocab_size)
    writer.add_expert_count(config.num_local_experts if mixtral else config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if "head_dim" in config.to_diff_dict() and config.head_dim is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize_experts else gguf.LlamaFileType.ALL_F32)
    if mixtral:
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    else:
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", 0):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    _copy_tokenizer(writer, GGUFFile(tokenizer_gguf).fields)

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    # llama.cpp has no dense MLP in qwen3moe; our loader takes one (mlp_only_layers) under llama's names
    dense_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    stored: dict[str, np.ndarray] = {}
    stacks: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, tensor in state.items():
        weight = tensor.numpy()
        if m := _EXPERT.fullmatch(name):
            if split_experts:
                gguf_name = f"blk.{m[1]}.ffn_{_PART[m[3]]}.{m[2]}.weight"
                stored[gguf_name] = weight
                writer.add_tensor(gguf_name, weight)
            else:
                stacks.setdefault((m[1], _PART[m[3]]), {})[int(m[2])] = weight
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base) or dense_names.get_name(base)}.{suffix}"
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
            weight = weight.reshape(-1)
        if mixtral and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            weight = _permute(weight, heads)
        stored[gguf_name] = weight
        writer.add_tensor(gguf_name, weight)
    for (layer, part), experts in stacks.items():
        gguf_name = f"blk.{layer}.ffn_{part}_exps.weight"
        weight = np.stack([experts[e] for e in range(len(experts))])  # converter: torch.stack(dim=0)
        if quantize_experts:
            packed = quantize(weight, _Q8)
            writer.add_tensor(gguf_name, packed, raw_dtype=_Q8)
            weight = gguf.quants.dequantize(packed, _Q8)
        stored[gguf_name] = weight
        if not quantize_experts:
            writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from HF's rotate-half order to interleaved pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _stack_of(hf_name: str) -> tuple[str, int]:
    """The stacked GGUF tensor holding an HF per-expert weight, and the expert's index in it."""
    m = _EXPERT.fullmatch(hf_name)
    assert m is not None, hf_name
    return f"blk.{m[1]}.ffn_{_PART[m[3]]}_exps.weight", int(m[2])


def _copy_tokenizer(writer: gguf.GGUFWriter, fields: dict) -> None:
    """What llama.cpp's ``_set_vocab_gpt2`` writes for a GPT-2 style BPE (SmolLM2's)."""
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(fields["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(fields["tokenizer.chat_template"])


@pytest.fixture(scope="module")
def moe_ggufs(moe_model, smollm2_path, tmp_path_factory):
    """``moe_ggufs(name, quantized, split_experts)`` -> (gguf path, tensors as stored); each file written once."""
    made: dict[tuple[str, bool, bool], tuple[Path, dict[str, np.ndarray]]] = {}

    def get(name: str, quantized: bool = False, split: bool = False) -> tuple[Path, dict[str, np.ndarray]]:
        if (name, quantized, split) not in made:
            stem = f"{name}{'-q8_0' if quantized else ''}{'-split' if split else ''}"
            path = tmp_path_factory.mktemp("gguf_moe") / f"{stem}.gguf"
            stored = write_moe_gguf(moe_model(name), ARCH[name], path, smollm2_path, quantized, split)
            made[name, quantized, split] = path, stored
        return made[name, quantized, split]

    return get


@pytest.mark.parametrize(
    ("name", "quantized", "split"),
    [
        ("qwen3_moe", False, False),
        ("qwen2_moe", False, False),
        ("qwen3_moe", True, False),
        ("mixtral", False, False),
        ("mixtral", False, True),
    ],
)
def test_every_tensor_maps_and_experts_equal_the_original(
    name, quantized, split, moe_ggufs, moe_model
) -> None:
    path, stored = moe_ggufs(name, quantized, split)
    original = load_file(Path(moe_model(name)) / "model.safetensors")
    arch = ARCH[name]
    for tensor in GGUFFile(path).tensors:  # every GGUF tensor has HF names, all of them in the original
        if gguf_moe.is_expert_stack(tensor.name):
            experts = {hf_tensor_name(tensor.name, expert=e, arch=arch) for e in range(tensor.shape[2])}
            assert experts <= set(original)
        else:
            assert hf_tensor_name(tensor.name, arch=arch) in original, tensor.name
    ours = dict(iter_gguf_weights(path))
    assert set(ours) == set(original)
    for hf_name, weight in ours.items():
        assert weight.dtype == torch.float32 and weight.shape == original[hf_name].shape, hf_name
        if quantized and _EXPERT.fullmatch(hf_name):  # Q8_0: the reference dequantizer's values
            stack, expert = _stack_of(hf_name)
            expected = torch.from_numpy(stored[stack][expert])
        else:
            expected = original[hf_name]
        assert torch.equal(weight, expected), hf_name
    if arch == "llama":  # the file holds llama.cpp's permuted Q/K rows, which the loader undid
        q_proj = original["model.layers.0.self_attn.q_proj.weight"].numpy()
        assert not np.array_equal(stored["blk.0.attn_q.weight"], q_proj)
    with pytest.raises(ValueError, match="pass expert="):
        hf_tensor_name("blk.0.ffn_up_exps.weight", arch=arch)


def test_kept_quantized_stream_still_dequantizes_experts(moe_ggufs) -> None:
    """``keep_quantized`` leaves routed experts to the MoE layers as float tensors (their Q8_0 stacks dequantized
    per expert, as without it)."""
    path, _ = moe_ggufs("qwen3_moe", quantized=True)
    dense = dict(iter_gguf_weights(path))
    kept = dict(iter_gguf_weights(path, keep_quantized=True))
    assert kept.keys() == dense.keys()
    for hf_name, weight in kept.items():
        assert isinstance(weight, torch.Tensor) and torch.equal(weight, dense[hf_name]), hf_name


@pytest.mark.parametrize(("name", "first", "end"), [("qwen3_moe", 4, 8), ("mixtral", 2, 4)])
def test_wanted_experts_only_and_only_their_rows(
    name, first, end, moe_ggufs, moe_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, stored = moe_ggufs(name, quantized=True)
    config = AutoConfig.from_pretrained(moe_model(name))
    hidden, inter = config.hidden_size, getattr(config, "moe_intermediate_size", config.intermediate_size)
    rows_read: list[int] = []
    real = gguf_moe.dequantize

    def spy(data, qtype):
        rows_read.append(data.shape[0])
        return real(data, qtype)

    monkeypatch.setattr(gguf_moe, "dequantize", spy)

    def wanted(
        hf_name: str,
    ) -> bool:  # what an expert-parallel rank holding experts first..end-1 of layer 0 asks
        m = _EXPERT.fullmatch(hf_name)
        return m is not None and m[1] == "0" and first <= int(m[2]) < end

    got = dict(iter_gguf_weights(path, wanted))
    names = GGUF_ARCHS[ARCH[name]].moe_names
    assert set(got) == {names.expert(0, e, p) for e in range(first, end) for p in ("gate", "up", "down")}
    for hf_name, weight in got.items():
        stack, expert = _stack_of(hf_name)
        assert torch.equal(weight, torch.from_numpy(stored[stack][expert]))
    # each wanted expert's gate and up (I rows) and down (H rows) dequantized alone; other layers' stacks never read
    assert sorted(rows_read) == sorted([inter] * 2 * (end - first) + [hidden] * (end - first))


_CONFIG_FIELDS = (
    "architectures",
    "num_experts_per_tok",
    "num_key_value_heads",
    "tie_word_embeddings",
    "rope_parameters",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
)
_FAMILY_FIELDS = {
    "qwen3_moe": ("num_experts", "moe_intermediate_size", "mlp_only_layers", "norm_topk_prob", "head_dim"),
    "qwen2_moe": (
        "num_experts",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "mlp_only_layers",
    ),
    "mixtral": ("num_local_experts", "intermediate_size", "max_position_embeddings", "num_hidden_layers"),
}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_engine_on_gguf_matches_transformers_on_the_original(
    name, moe_ggufs, moe_model, moe_reference, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = moe_ggufs(name)
    monkeypatch.setenv("SGL_RAY_CACHE_DIR", str(tmp_path))  # the converted config/tokenizer dir goes there
    original = AutoConfig.from_pretrained(moe_model(name))
    converted = load_hf_config(resolve_model(str(path)))
    assert converted.model_type == original.model_type
    for field in _CONFIG_FIELDS + _FAMILY_FIELDS[name]:
        assert getattr(converted, field, None) == getattr(original, field, None), field
    assert _head_dim(converted) == _head_dim(original)
    assert converted.rms_norm_eps == pytest.approx(original.rms_norm_eps, rel=1e-6)  # GGUF stores it as f32
    with sgl_ray.Engine(str(path), chunked_prefill_size=16, max_total_tokens=1024) as engine:
        prompts = ["The capital of France is", "def fibonacci(n):\n    " * 3, "Hi"]
        lists = [engine.tokenizer.encode(p) for p in prompts]
        outs = engine.generate(input_ids=lists, sampling_params=GREEDY)
    reference = moe_reference(name)
    for ids, out in zip(lists, outs, strict=True):
        assert out["output_ids"] == reference(ids, NEW), f"mismatch for a {len(ids)}-token prompt"


def test_early_mixtral_file_config_from_the_token_list(moe_ggufs, moe_model) -> None:
    """Early Mixtral files: per-expert tensors, no ``llama.vocab_size``; the config takes the token list's length."""
    path, _ = moe_ggufs("mixtral", split=True)
    reader = GGUFFile(path)
    assert "llama.vocab_size" not in reader.fields and not any(
        gguf_moe.is_expert_stack(t.name) for t in reader.tensors
    )
    fields = gguf_moe.mixtral_config(reader)
    original = AutoConfig.from_pretrained(moe_model("mixtral"))
    assert fields["vocab_size"] == original.vocab_size == len(reader.fields["tokenizer.ggml.tokens"])
    assert (fields["num_local_experts"], fields["num_experts_per_tok"]) == (4, 2)


def test_mixtral_with_dense_layers_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixtral.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_expert_count(4)
    writer.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((4, 8), dtype=np.float32))  # layer 1: no router
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 32, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"layers \[1\] have no router"):
        next(iter_gguf_weights(path))
    with pytest.raises(UnsupportedModelError, match=r"layers \[1\] have no router"):
        resolve_model(str(path))
