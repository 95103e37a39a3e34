"""ModelConfig normalisation across config styles."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

from sgl_ray.configs.model_config import ModelConfig, resolve_dtype


def test_shapes_and_rope_parameters_from_llama_config():
    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5e5,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=[7, 9],
    )
    mc = ModelConfig(cfg, torch.float32)
    assert (mc.head_dim, mc.num_kv_heads, mc.context_length) == (16, 2, 2048)
    assert mc.rope_parameters["rope_type"] == "default" and mc.rope_parameters["rope_theta"] == 5e5
    assert mc.tie_word_embeddings and mc.eos_token_ids == (7, 9)
    assert mc.architecture == "LlamaForCausalLM"
    assert mc.kv_bytes_per_token() == 2 * cfg.num_hidden_layers * 2 * 16 * 4


def test_context_length_override_and_sliding_windows():
    """Mistral's window is honoured on every layer, Qwen2's only where ``use_sliding_window`` is on; a model file
    that does not implement its config's window (Mixtral) caps the context at it instead."""
    mistral = ModelConfig(MistralConfig(max_position_embeddings=32768, sliding_window=4096), torch.float32)
    assert mistral.context_length == 32768 and mistral.sliding_window_of(0) == 4096
    assert ModelConfig(mistral.hf_config, torch.float32, context_length_override=1000).context_length == 1000
    qwen = Qwen2Config(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False)
    assert ModelConfig(qwen, torch.float32).context_length == 32768
    assert ModelConfig(qwen, torch.float32).sliding_window_of(0) is None
    mixtral = MixtralConfig(max_position_embeddings=32768, sliding_window=4096)
    assert ModelConfig(mixtral, torch.float32).context_length == 4096


def test_auto_dtype():
    cfg = LlamaConfig(torch_dtype="bfloat16")
    assert resolve_dtype("auto", cfg, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", cfg, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", cfg, torch.device("cpu")) == torch.float16


def test_attention_backend_names_are_checked():
    """An unknown backend name, or FlashInfer off CUDA, is a typed error naming ``attention_backend``."""
    import pytest
    import torch

    from sgl_ray.attention import create_attention_backend
    from sgl_ray.errors import InvalidRequestError

    for name in ("no-such-backend", "flashinfer"):
        with pytest.raises(InvalidRequestError) as info:
            create_attention_backend(name, torch.device("cpu"))
        assert info.value.param == "attention_backend"


def test_device_dependent_defaults_and_their_cli_flags():
    """Mixed chunks and jump-forward default to on for CPU and off on CUDA; either side can be forced, also from
    the command line (``--disable-jump-forward`` / ``--no-disable-jump-forward``)."""
    import argparse

    from sgl_ray.configs.engine_args import EngineArgs

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = EngineArgs()
    assert auto.effective_jump_forward(cpu) and not auto.effective_jump_forward(cuda)
    assert auto.effective_mixed_chunk(cpu) and not auto.effective_mixed_chunk(cuda)
    assert EngineArgs(disable_jump_forward=False).effective_jump_forward(cuda)
    assert not EngineArgs(disable_jump_forward=True).effective_jump_forward(cpu)
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    for argv, expected in (
        ([], None),
        (["--disable-jump-forward"], True),
        (["--no-disable-jump-forward"], False),
    ):
        assert parser.parse_args(argv).disable_jump_forward is expected


def test_triton_num_kv_splits_reaches_the_backend_and_is_checked():
    """``triton_attention_num_kv_splits`` (``--triton-attention-num-kv-splits``) fixes the Triton backend's decode
    split count; a count that is not a power of two up to 64, or the option with another backend, is a typed
    error naming it."""
    import argparse

    import pytest

    from sgl_ray.attention import create_attention_backend
    from sgl_ray.attention.triton_backend import TritonAttentionBackend
    from sgl_ray.configs.engine_args import EngineArgs
    from sgl_ray.errors import InvalidRequestError

    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p)
    args = EngineArgs.from_cli_args(p.parse_args(["--triton-attention-num-kv-splits", "8"]))
    assert args.triton_attention_num_kv_splits == 8 and EngineArgs().triton_attention_num_kv_splits is None
    backend = create_attention_backend("triton", torch.device("cpu"), args.triton_attention_num_kv_splits)
    assert isinstance(backend, TritonAttentionBackend) and backend.num_kv_splits == 8
    assert create_attention_backend("triton", torch.device("cpu")).num_kv_splits is None
    for bad in (0, 3, 128):
        with pytest.raises(InvalidRequestError) as info:
            EngineArgs(triton_attention_num_kv_splits=bad)
        assert info.value.param == "triton_attention_num_kv_splits"
    with pytest.raises(InvalidRequestError) as info:
        create_attention_backend("torch", torch.device("cpu"), 4)
    assert info.value.param == "triton_attention_num_kv_splits"


def test_gemma_rope_per_layer_type_and_embedding_scale():
    """Gemma 3 keys its rope parameters by layer type (local layers: their own base; global ones: rope_theta and
    the scaling); Gemma's embedding scale sqrt(hidden) is rounded to the model's dtype, as transformers rounds it."""
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(
        hidden_size=3072,
        num_attention_heads=4,
        num_hidden_layers=6,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        architectures=["Gemma3ForCausalLM"],
    )
    mc = ModelConfig(cfg, torch.float32)
    local, full = mc.rope_parameters_of(0), mc.rope_parameters_of(5)
    assert cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[5] == "full_attention"
    assert local == {"rope_type": "default", "rope_theta": 10_000.0}
    assert full == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}
    assert mc.rope_parameters == full
    assert mc.sliding_window_of(0) == 4096 and mc.sliding_window_of(5) is None
    assert mc.embedding_multiplier == float(torch.tensor(3072**0.5))
    assert ModelConfig(cfg, torch.bfloat16).embedding_multiplier == 55.5  # sqrt(3072) = 55.4256...
    assert ModelConfig(LlamaConfig(), torch.float32).rope_parameters_of(3)["rope_theta"] == 10000.0
