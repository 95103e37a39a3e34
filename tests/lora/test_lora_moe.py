"""LoRA on an MoE model: an adapter on the attention projections gives transformers + peft's greedy tokens; adapters
on a sparse layer's experts (peft's expert parameters, or per-expert projections) are refused with a typed
error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sgl_ray
from sgl_ray.errors import InvalidRequestError

from ..engine.prompts import PROMPTS
from .adapters import PeftReference, make_adapter

NEW = 8
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


@pytest.fixture(scope="module")
def moe_adapter(moe_model, tmp_path_factory) -> tuple[str, str]:
    pytest.importorskip("peft")
    base = moe_model("qwen3_moe")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return base, make_adapter(base, tmp_path_factory.mktemp("moe_lora"), 8, 16, targets, False, seed=3)


def test_attention_and_dense_layer_adapter_matches_peft(moe_adapter):
    base, adapter = moe_adapter
    ref = PeftReference(base, {"a": adapter})
    with sgl_ray.Engine(base, lora_paths=[f"a={adapter}"], max_total_tokens=2048) as engine:
        prompts = [engine.tokenizer.encode(p) for p in PROMPTS[1:4]]
        for name in (None, "a"):
            outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=name)
            for ids, out in zip(prompts, outs, strict=True):
                assert out["output_ids"] == ref(name, ids, NEW), (name, len(ids))
        assert any(ref("a", ids, NEW) != ref(None, ids, NEW) for ids in prompts)  # the adapter matters


def test_adapter_on_experts_is_refused(moe_adapter, tmp_path):
    base, adapter = moe_adapter
    # peft's own adapter of the experts (LoRA on the fused expert parameters)
    experts = make_adapter(
        base, tmp_path / "peft_experts", 4, 8, ["gate_proj", "up_proj", "down_proj"], False, 1
    )
    with pytest.raises(InvalidRequestError, match="experts of an MoE layer"):
        sgl_ray.Engine(base, lora_paths=[f"experts={experts}"], max_total_tokens=2048)
    # per-expert projections named like a dense MLP's
    bad = tmp_path / "experts"
    shutil.copytree(adapter, bad)
    (file,) = bad.glob("*.safetensors")
    tensors = load_file(file)
    rank = json.loads((bad / "adapter_config.json").read_text())["r"]
    prefix = "base_model.model.model.layers.0.mlp.experts.3.gate_proj"
    tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, 64)
    tensors[f"{prefix}.lora_B.weight"] = torch.zeros(32, rank)
    save_file(tensors, file)
    with pytest.raises(InvalidRequestError, match="experts of an MoE layer"):
        sgl_ray.Engine(base, lora_paths=[f"bad={bad}"], max_total_tokens=2048)
