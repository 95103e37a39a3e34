"""Draft models for the speculative-decoding tests.

``draft_of(target, noise)`` is the target with every matrix perturbed by ``noise`` times its spread: another model
with the same vocabulary whose greedy choices agree with the target's often but not always, so verify steps keep
some drafts and reject others. The small-vocabulary pair (512 tokens) keeps the statistical test cheap.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from ..conftest import save_tiny_model


def perturbed_copy(src: str, dst: Path, noise: float, seed: int) -> str:
    """``src`` (a safetensors model directory) with each 2-D weight plus ``noise * std * N(0, 1)``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    g = torch.Generator().manual_seed(seed)
    weights = load_file(str(Path(src) / "model.safetensors"))
    out = {
        k: v + noise * v.std() * torch.randn(v.shape, generator=g) if v.dim() > 1 else v
        for k, v in weights.items()
    }
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="session")
def tiny_draft_path(tiny_llama_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's tiny Llama, perturbed: agrees with it on about a quarter of greedy drafts."""
    return perturbed_copy(tiny_llama_path, tmp_path_factory.mktemp("tiny_draft"), noise=0.05, seed=5)


@pytest.fixture(scope="session")
def small_vocab_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(target, draft): a 2-layer Llama over 512 tokens (no tokenizer; token-id prompts) and a perturbed copy."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    target = save_tiny_model(config, tmp_path_factory.mktemp("small_vocab_target"), None)
    draft = perturbed_copy(target, tmp_path_factory.mktemp("small_vocab_draft"), noise=0.15, seed=7)
    return target, draft


@pytest.fixture(scope="session")
def ngram_target(tiny_llama_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama with its attention and MLP outputs scaled down (x0.01): the current token decides most of
    the next one, so a continuation repeated in the prompt is often repeated again (NGRAM drafts that hold), while
    attention still decides others (drafts rejected and rolled back)."""
    dst = tmp_path_factory.mktemp("ngram_target")
    shutil.copytree(tiny_llama_path, dst, dirs_exist_ok=True)
    weights = load_file(str(Path(tiny_llama_path) / "model.safetensors"))
    scaled = {
        k: v * 0.01 if k.endswith(("o_proj.weight", "down_proj.weight")) else v for k, v in weights.items()
    }
    save_file(scaled, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)
