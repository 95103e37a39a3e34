"""Quantized safetensors checkpoints in the engine (CPU, fp32) against transformers on the float weights they mean.

Each case writes a tiny random Llama or Qwen3 (hidden 128, 2 layers) with every projection quantized by the test
(:mod:`.packing`: AWQ, GPTQ v1 with act order, FP8 per tensor / 128x128 blocks, compressed-tensors FP8 per channel)
and a matching ``quantization_config``, plus a float copy of the dequantized weights that transformers loads (online
FP8: a float checkpoint, and the float copy holds what per-channel e4m3 makes of it). Greedy tokens must be equal
and each sampled token's logprob within ``LOGPROB_TOL`` of transformers'. On a CPU the kept weights decode to
exactly the reference's float32 values, so only the summation order differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen3Config

import sgl_ray
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.quantization import QuantizedWeight

from .packing import (
    TINY_SHAPE,
    awq_tensors,
    fp8_blocks,
    fp8_online_reference,
    fp8_per_channel,
    fp8_per_tensor,
    gptq_tensors,
    quantize_int4,
    write_quantized,
)

NEW = 8
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
LOGPROB_TOL = 2e-4  # fp32 on both sides, same weights: summation order only
PROMPTS = [
    [7, 300, 41, 5],
    [3, 14, 159, 265, 358, 97, 93, 238, 462, 64, 33, 83, 279, 50, 288, 419, 71],
    [11] * 3,
]


def _awq(w):
    gq = quantize_int4(w, 32)
    return awq_tensors(gq), gq.dequantized()


def _gptq_act_order(w):
    gq = quantize_int4(w, 64, sym=True, act_order_seed=w.shape[0] + w.shape[1])
    return gptq_tensors(gq, v1=True), gq.dequantized()


def _online(w):
    return {"weight": w}, fp8_online_reference(w)


def _int4_bytes(group: int):
    """INT4 held bytes of a [rows, cols] weight: half a byte a value, a 2-byte scale and a 1-byte zero per group."""
    return lambda rows, cols: rows * cols // 2 + rows * (cols // group) * 3


def _fp8_bytes(block: int | None):
    """FP8 held bytes: a byte a value, a float32 scale per row (and 128-column block)."""
    return lambda rows, cols: rows * cols + 4 * rows * (1 if block is None else -(-cols // block))


class Case(NamedTuple):
    family: str
    quantize: object  # float weight -> (checkpoint tensors by leaf, float reference)
    config: dict | None  # quantization_config
    option: str | None  # the engine's quantization option
    kind: str  # the kept weights' encoding
    held_bytes: object  # (rows, cols) -> bytes one weight piece takes as held (without an act-order g_idx)


AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": True}
FP8_BLOCK_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
FP8_TENSOR_CONFIG = {"quant_method": "fp8", "activation_scheme": "static"}
COMPRESSED_TENSORS_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    },
    "ignore": ["lm_head"],
}

CASES = {
    "awq": Case("llama", _awq, AWQ_CONFIG, None, "AWQ", _int4_bytes(32)),
    "gptq-act-order": Case("qwen3", _gptq_act_order, GPTQ_CONFIG, "gptq", "GPTQ", _int4_bytes(64)),
    "fp8-blocks": Case(
        "qwen3", lambda w: fp8_blocks(w, 128), FP8_BLOCK_CONFIG, "fp8", "FP8", _fp8_bytes(128)
    ),
    "fp8-per-tensor": Case("llama", fp8_per_tensor, FP8_TENSOR_CONFIG, None, "FP8", _fp8_bytes(None)),
    "compressed-tensors": Case(
        "llama", fp8_per_channel, COMPRESSED_TENSORS_CONFIG, None, "FP8", _fp8_bytes(None)
    ),
    "online-fp8": Case("llama", _online, None, "fp8", "FP8", _fp8_bytes(None)),
}


def _config(family: str) -> PretrainedConfig:
    if family == "qwen3":
        return Qwen3Config(**TINY_SHAPE, tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"])
    return LlamaConfig(**TINY_SHAPE, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def _save_float(state: dict[str, torch.Tensor], config: dict, directory: Path) -> str:
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


class Written(NamedTuple):
    path: str  # the quantized checkpoint
    float_path: str  # the float copy of what it means
    reference: torch.nn.Module  # transformers on the float copy


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``written(name)`` -> the checkpoint of ``CASES[name]`` and its transformers reference (built on first use)."""
    built: dict[str, Written] = {}

    def get(name: str) -> Written:
        if name not in built:
            case = CASES[name]
            hf_config = _config(case.family)
            config = json.loads(hf_config.to_json_string())
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
            state = dict(model.state_dict())
            if hf_config.tie_word_embeddings:
                state.pop("lm_head.weight")
            root = tmp_path_factory.mktemp(name)
            reference = write_quantized(state, config, root / "quantized", case.quantize, case.config)
            float_dir = _save_float(reference, config, root / "float")
            hf = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
            built[name] = Written(str(root / "quantized"), float_dir, hf)
        return built[name]

    return get


def _engine(path: str, quantization: str | None) -> sgl_ray.Engine:
    return sgl_ray.Engine(
        path, quantization=quantization, skip_tokenizer_init=True, device="cpu", max_total_tokens=256
    )


def _reference(hf: torch.nn.Module, ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from transformers."""
    seq = list(ids)
    lps = []
    with torch.no_grad():
        for _ in range(NEW):
            logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0, -1].float(), dim=-1)
            tok = int(logp.argmax())
            lps.append(logp[tok].item())
            seq.append(tok)
    return seq[len(ids) :], lps


def _check_weight_bytes(reported: int, model: torch.nn.Module, case: Case) -> None:
    """``get_stats()["weight_bytes"]``: the float parameters plus each projection's encoded bytes, which are about
    a quarter (INT4) or a half (FP8) of the same weights in fp16, plus their scales."""
    held = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    assert len(held) == 4 * TINY_SHAPE["num_hidden_layers"]  # qkv, o, gate_up, down
    fp16 = 2 * sum(w.rows * w.cols for w in held)
    # act order: each segment keeps the int32 group of each column
    g_idx = sum(4 * m.shape[1] for w in held for _, m in w.segments if getattr(m, "g_idx", None) is not None)
    expected = sum(case.held_bytes(m.shape[0], m.shape[1]) for w in held for _, m in w.segments) + g_idx
    assert sum(w.nbytes for w in held) == expected
    assert reported == expected + sum(p.nbytes for p in model.parameters())
    quarter = case.kind != "FP8"
    assert (0.25 if quarter else 0.5) < expected / fp16 < (0.32 if quarter else 0.54), expected / fp16


@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_transformers(name, written):
    case, w = CASES[name], written(name)
    with _engine(w.path, case.option) as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
        model = engine._core.runner.model
        attn = model.model.layers[0].self_attn
        # q, k and v in one segment, or (act order: each its own g_idx) side by side
        qkv = attn.qkv_proj.weight
        assert isinstance(qkv, QuantizedWeight) and set(qkv.kinds) == {case.kind}
        assert isinstance(model.model.layers[1].mlp.down_proj.weight, QuantizedWeight)
        assert not isinstance(model.model.embed_tokens.weight, QuantizedWeight)
        _check_weight_bytes(engine.get_stats()["weight_bytes"], model, case)
    for ids, out in zip(PROMPTS, outs, strict=True):
        tokens, logprobs = _reference(w.reference, ids)
        assert out["output_ids"] == tokens, f"{name}: a {len(ids)}-token prompt"
        got = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=LOGPROB_TOL)


def test_none_dequantizes_a_quantized_checkpoint_at_load(written):
    """``quantization="none"`` on an AWQ checkpoint: float weights, the same tokens."""
    w = written("awq")
    with _engine(w.path, "none") as engine:
        out = engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY)
        model = engine._core.runner.model
        assert not any(isinstance(m, QuantizedWeight) for m in model.modules())
    assert out["output_ids"] == _reference(w.reference, PROMPTS[1])[0]


def test_option_that_contradicts_the_checkpoint_fails_at_start(written):
    with pytest.raises(UnsupportedModelError, match="quantization='gptq'.*'awq'") as info:
        sgl_ray.Engine(written("awq").path, quantization="gptq", skip_tokenizer_init=True, device="cpu")
    assert info.value.param == "quantization"


def test_lora_on_a_quantized_base(written, tmp_path):
    """A LoRA adapter on the AWQ base: the engine's greedy tokens are those of transformers + peft on the float
    weights the checkpoint means."""
    pytest.importorskip("peft")
    from peft import PeftModel

    from ..lora.adapters import ALL, make_adapter

    w = written("awq")
    adapter = make_adapter(w.float_path, tmp_path / "adapter", 8, 16, ALL, False, seed=3)
    with sgl_ray.Engine(
        w.path, lora_paths=[f"a={adapter}"], skip_tokenizer_init=True, device="cpu", max_total_tokens=256
    ) as engine:
        outs = engine.generate(input_ids=PROMPTS[:2], sampling_params=GREEDY, lora_path=["a", None])
    base = AutoModelForCausalLM.from_pretrained(w.float_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    assert outs[0]["output_ids"] == _reference(peft_model, PROMPTS[0])[0]
    assert outs[1]["output_ids"] == _reference(w.reference, PROMPTS[1])[0]
    assert outs[0]["output_ids"] != _reference(w.reference, PROMPTS[0])[0]  # the adapter changes the answer
