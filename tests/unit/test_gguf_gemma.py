"""Gemma GGUF files (``gemma2``, ``gemma3``): tensor names and norm weights against transformers' own GGUF loader on
tiny files written here as llama.cpp's converter writes them (its tensor names from the ``gguf`` package, 1 added
to every norm weight), and the config fields the conversion adds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, PreTrainedModel

from sgl_ray.model_loader import iter_gguf_weights
from sgl_ray.model_loader.gguf_gemma import gemma_config_fields

SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    sliding_window=8,
)


def _model(arch: str) -> PreTrainedModel:
    config = Gemma2Config(**SHAPE) if arch == "gemma2" else Gemma3TextConfig(**SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # transformers initialises them to 0
                param.normal_(0.0, 0.5)
    return model


def _write_gguf(model: PreTrainedModel, arch: str, path: Path) -> None:
    config = model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_sliding_window(config.sliding_window)
    writer.add_vocab_size(config.vocab_size)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied
            continue
        base, suffix = name.rsplit(".", 1)
        weight = tensor.numpy()
        if name.endswith("norm.weight"):
            weight = weight + np.float32(1.0)  # llama.cpp's Gemma converters
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_weights_equal_transformers(arch: str, tmp_path: Path) -> None:
    model = _model(arch)
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, arch, path)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    ours = dict(iter_gguf_weights(path))
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    original = model.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name  # the same float32 "stored - 1"
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=1e-6)  # the 1 is off again
    assert any(".pre_feedforward_layernorm." in name for name in ours)


def _reader(arch: str, tokens: list[str], **fields) -> SimpleNamespace:
    base = {f"{arch}.block_count": 18, f"{arch}.attention.head_count": 4, f"{arch}.embedding_length": 640}
    return SimpleNamespace(fields={**base, "tokenizer.ggml.tokens": tokens, **fields})


def test_gemma_config_fields() -> None:
    tokens = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    config = SimpleNamespace(eos_token_id=1, head_dim=256, rope_parameters=None)
    fields = gemma_config_fields("gemma3", _reader("gemma3", tokens), config)
    assert fields == {"eos_token_id": [1, 4], "query_pre_attn_scalar": 256}
    # Gemma 3 27B: hidden / heads; the global layers' linear rope scaling from the file
    rope = {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_theta": 1e4},
    }
    reader = _reader("gemma3", tokens[:3], **{"gemma3.block_count": 62, "gemma3.embedding_length": 5376})
    reader.fields.update({"gemma3.attention.head_count": 32, "gemma3.rope.scaling.type": "linear"})
    reader.fields["gemma3.rope.scaling.factor"] = 8.0
    config = SimpleNamespace(eos_token_id=[1, 4], head_dim=128, rope_parameters=rope)
    fields = gemma_config_fields("gemma3", reader, config)
    assert fields["query_pre_attn_scalar"] == 168 and "eos_token_id" not in fields
    assert fields["rope_parameters"]["full_attention"] == {
        "rope_type": "linear",
        "factor": 8.0,
        "rope_theta": 1e6,
    }
    assert fields["rope_parameters"]["sliding_attention"] == {"rope_theta": 1e4}
    # Gemma 2: the caps the file carries; nothing for other architectures
    reader = _reader("gemma2", tokens, **{"gemma2.attn_logit_softcapping": 50.0})
    fields = gemma_config_fields("gemma2", reader, SimpleNamespace(eos_token_id=[1, 4]))
    assert fields == {"attn_logit_softcapping": 50.0}
    assert gemma_config_fields("llama", reader, config) == {}
