"""examples/train_eagle.py for a few steps on the tiny Llama (CPU): the head it saves loads as an EAGLE checkpoint
and the engine's greedy outputs with it are those without speculation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from safetensors import safe_open

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_eagle.py"


def test_train_eagle_tiny(tiny_llama_path, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_eagle", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "head"
    report = module.main(
        [
            *("--model", tiny_llama_path, "--out", str(out), "--device", "cpu"),
            *("--num-prompts", "2", "--samples", "2", "--max-new-tokens", "8", "--steps", "3"),
            *("--batch-size", "2", "--eval-tokens", "8", "--num-steps", "2", "--engine-tokens", "2048"),
        ]
    )
    assert report["identical"] and report["accept_length"] >= 1.0
    log = capsys.readouterr().out
    assert "step     2" in log and "data: 4 sequences" in log
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle"] and config["num_hidden_layers"] == 1
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert {
        "fc.weight",
        "fc.bias",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.mlp.down_proj.weight",
    } <= names
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)  # shared from the target
