"""INT4 at load: ``quantization="awq"`` / ``"gptq"`` on a float model (a float checkpoint, or ``load_format="dummy"``)
holds the same matrices as a checkpoint of that format written by the test's own packer from the same weights, gives
its greedy tokens, and shrinks ``weight_bytes`` as the format says; the roofline reads those bytes back."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import sgl_ray
from sgl_ray.bench.roofline import ModelCost, held_weight_bytes
from sgl_ray.layers.quantization import QuantizedWeight
from sgl_ray.layers.quantization.int4_formats import quantize_awq, quantize_gptq

from .packing import TINY_SHAPE, awq_tensors, gptq_tensors, quantize_int4, write_quantized

TINY = {**TINY_SHAPE, "tie_word_embeddings": False}
PROMPTS = [[7, 300, 41, 5], [3, 14, 159, 265, 358, 97, 93, 238], [11] * 3]
GREEDY = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
CHECKPOINT = {
    "awq": (
        lambda w: awq_tensors(quantize_int4(w, 128)),
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    ),
    "gptq": (
        lambda w: gptq_tensors(quantize_int4(w, 128, sym=True), v1=True),
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    ),
}


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(**TINY)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory = tmp_path_factory.mktemp("int4_float")
    model.save_pretrained(directory)
    return directory, config, model.state_dict()


def _engine(path, **kwargs):
    return sgl_ray.Engine(str(path), skip_tokenizer_init=True, max_total_tokens=512, **kwargs)


def _held(engine) -> dict[str, QuantizedWeight]:
    model = engine._core.runner.model
    return {
        n: m.weight
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), QuantizedWeight)
    }


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_the_quantizer_writes_what_the_test_packer_writes(method):
    w = torch.randn(48, 256)
    ours = (quantize_awq if method == "awq" else quantize_gptq)(w, 128)
    theirs = CHECKPOINT[method][0](w)
    assert ours.keys() == theirs.keys()
    for leaf in ours:
        assert torch.equal(ours[leaf], theirs[leaf]), leaf


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_float_checkpoint_at_load_matches_the_checkpoint_path(method, float_model, tmp_path):
    directory, config, state = float_model
    quantize, qconfig = CHECKPOINT[method]
    write_quantized(state, config.to_dict(), tmp_path, lambda w: (quantize(w), None), qconfig)
    with _engine(directory) as plain:
        float_bytes = plain.get_stats()["weight_bytes"]
    with _engine(directory, quantization=method) as at_load, _engine(tmp_path) as checkpoint:
        ours, theirs = _held(at_load), _held(checkpoint)
        assert ours.keys() == theirs.keys() and len(ours) == 2 * 4  # qkv, o, gate_up, down per layer
        for name, weight in ours.items():
            (_, a), (_, b) = weight.segments[0], theirs[name].segments[0]
            assert len(weight.segments) == 1 and a.kind == b.kind == method.upper()
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
            assert torch.equal(a.zeros, b.zeros)
        ids = [
            [o["output_ids"] for o in e.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
            for e in (at_load, checkpoint)
        ]
        assert ids[0] == ids[1]
        held = at_load.get_stats()["weight_bytes"]
        assert held == checkpoint.get_stats()["weight_bytes"]
    # every projection [N, K]: 4 float32 bytes a weight -> half a byte plus a 2-byte scale and 1-byte zero per group
    proj = [t for n, t in state.items() if n.endswith("proj.weight")]
    assert float_bytes - held == sum(
        4 * t.numel() - (t.numel() // 2 + 3 * t.shape[0] * (t.shape[1] // 128)) for t in proj
    )


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_dummy_weights_quantized_at_load(method, float_model):
    """``load_format="dummy"``: the same random float weights (one seed), each held rounded to its group's
    steps; the roofline's bytes are the engine's."""
    directory = float_model[0]
    with _engine(directory, load_format="dummy", random_seed=3) as plain:
        dense = {
            n: m.weight.detach().clone()
            for n, m in plain._core.runner.model.named_modules()
            if n.endswith("proj")
        }
    with _engine(directory, load_format="dummy", random_seed=3, quantization=method) as eng:
        runner = eng._core.runner
        held = _held(eng)
        assert held.keys() == dense.keys()
        for name, weight in held.items():
            matrix = weight.segments[0][1]
            step = matrix.scales.float().repeat_interleave(128, dim=1)
            err = (matrix.dequantize() - dense[name].float()).abs()
            assert (err <= step + 1e-6).all(), name  # a clamped extreme value can be off by up to one step
            assert err.mean() < 0.3 * step.mean(), name  # rounding to nearest: a quarter of a step on average
        assert len(eng.generate(input_ids=PROMPTS, sampling_params=GREEDY)[0]["output_ids"]) == 6
        by_kind = held_weight_bytes(runner.model)
        assert sum(by_kind.values()) == eng.get_stats()["weight_bytes"]
        assert by_kind[method.upper()] == sum(w.nbytes for w in held.values())
        measured, counted = (
            ModelCost.from_model(runner.model, runner.config),
            ModelCost.from_config(runner.config, method),
        )
        assert measured.weight_format == counted.weight_format == f"{method.upper()} + float32"
        # the same bytes but for the norms' weights, which the count from the config leaves out
        assert 0 <= measured.weight_bytes - counted.weight_bytes <= 4 * 128 * (2 * 2 + 1)
