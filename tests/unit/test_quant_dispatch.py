"""Which quantization a model gets, from its checkpoint's ``quantization_config`` and the ``quantization`` option,
and the typed errors at start (each names the option); how a checkpoint's per-layer parts are grouped into one
weight while streaming, and what a missing part says."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from sgl_ray.configs.engine_args import QUANTIZATION_METHODS, EngineArgs
from sgl_ray.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from sgl_ray.layers.quantization import Fp8Matrix, GPTQMatrix, checkpoint_quant_method, create_quant_method
from sgl_ray.layers.quantization.methods import (
    AWQMethod,
    FP8CheckpointMethod,
    GPTQMethod,
    OnlineFP8Method,
    check_fp8_device,
)
from sgl_ray.model_loader.quantized import quantized_weights

from ..quantization.packing import gptq_tensors, quantize_int4

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True}
FP8_BLOCKS = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
CT_FP8 = {
    "quant_method": "compressed-tensors",
    "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}},
}


def hf(quantization_config: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=quantization_config)


def held(option: str | None, config: dict | None, weight_format: str = "safetensors") -> str | None:
    return EngineArgs(quantization=option).effective_quantization(
        CPU, weight_format, checkpoint_quant_method(hf(config))
    )


def test_option_values_and_cli():
    assert QUANTIZATION_METHODS == ("awq", "gptq", "fp8", "compressed-tensors", "gguf", "none")
    with pytest.raises(InvalidRequestError, match="quantization"):
        EngineArgs(quantization="int4")
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args(["--quantization", "awq"])).quantization == "awq"


def test_the_checkpoint_decides_unless_told_otherwise():
    assert held(None, AWQ) == "awq"
    assert held("gptq", GPTQ) == "gptq"
    assert held("fp8", FP8_BLOCKS) == "fp8"
    assert held("fp8", CT_FP8) == "compressed-tensors"  # FP8 compressed-tensors is FP8
    assert held("none", AWQ) is None  # dequantized at load
    assert held(None, None) is None
    assert held("fp8", None) == "fp8"  # online
    assert held("fp8", None, "gguf") == "fp8"  # a GGUF file dequantized, then quantized to FP8
    assert held("none", AWQ, "dummy") is None
    assert held("awq", None) == "awq"  # a float checkpoint rounded to INT4 at load
    assert held("gptq", None, "dummy") == "gptq"  # random float weights, then INT4


@pytest.mark.parametrize(
    "option,config,weight_format,match",
    [
        ("gptq", AWQ, "safetensors", "quantization='gptq'.*quant_method 'awq'"),
        ("awq", FP8_BLOCKS, "safetensors", "quantization='awq'.*'fp8'"),
        (
            "compressed-tensors",
            None,
            "safetensors",
            "'compressed-tensors'.*needs a checkpoint quantized with",
        ),
        ("compressed-tensors", None, "gguf", "needs a checkpoint"),
        (None, {"quant_method": "bitsandbytes"}, "safetensors", "'bitsandbytes', which is not supported"),
        ("none", {"quant_method": "mxfp4"}, "safetensors", "'mxfp4', which is not supported"),
        (None, AWQ, "dummy", "load_format='dummy'"),
        ("gguf", None, "safetensors", "quantization='gguf' needs a .gguf"),
    ],
)
def test_contradictions_are_typed_errors_naming_the_option(option, config, weight_format, match):
    with pytest.raises(UnsupportedModelError, match=match) as info:
        held(option, config, weight_format)
    assert info.value.param == "quantization"


def test_methods_from_the_checkpoint_config():
    awq = create_quant_method("awq", hf(AWQ), CPU)
    assert isinstance(awq, AWQMethod) and awq.group_size == 128 and awq.keep
    gptq = create_quant_method("gptq", hf(GPTQ), CPU)
    assert isinstance(gptq, GPTQMethod) and gptq.desc_act and gptq.zero_offset == 1  # format v1
    v2 = create_quant_method("gptq", hf({**GPTQ, "checkpoint_format": "gptq_v2"}), CPU)
    assert v2.zero_offset == 0
    blocks = create_quant_method("fp8", hf(FP8_BLOCKS), CPU)
    assert isinstance(blocks, FP8CheckpointMethod) and blocks.block == (128, 128)
    ct = create_quant_method("compressed-tensors", hf(CT_FP8), CPU)
    assert ct.name == "compressed-tensors" and ct.block is None
    assert not create_quant_method(None, hf(AWQ), CPU).keep  # quantization="none": dequantized at load
    assert isinstance(create_quant_method("fp8", hf(None), CPU), OnlineFP8Method)
    assert create_quant_method(None, hf(None), CPU) is None
    assert create_quant_method("gguf", hf(None), CPU) is None


@pytest.mark.parametrize(
    "config,match",
    [
        ({**AWQ, "bits": 8}, "only 4-bit AWQ"),
        ({**AWQ, "version": "gemv"}, "'gemm' layout"),
        ({**GPTQ, "bits": 3}, "only 4-bit GPTQ"),
        ({**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
        ({**FP8_BLOCKS, "fmt": "e5m2"}, "only e4m3"),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}},
            },
            "only FP8 weights",
        ),
    ],
)
def test_unsupported_variants_name_the_option(config, match):
    method = checkpoint_quant_method(hf(config))
    with pytest.raises(UnsupportedModelError, match=match) as info:
        create_quant_method(method, hf(config), CPU)
    assert f"quantization={method!r}" in str(info.value) and info.value.param == "quantization"


def test_fp8_needs_compute_capability_8_9_on_cuda():
    check_fp8_device("fp8", CPU)  # weight-only on a CPU
    check_fp8_device("fp8", CUDA, capability=(9, 0))
    check_fp8_device("fp8", CUDA, capability=(8, 9))
    with pytest.raises(UnsupportedModelError, match=r"quantization='fp8'.*8\.9 or more.*has 8\.0") as info:
        check_fp8_device("fp8", CUDA, capability=(8, 0))
    assert info.value.param == "quantization"
    with pytest.raises(UnsupportedModelError, match="not mps"):
        check_fp8_device("fp8", torch.device("mps"))


def _gptq_layer(desc_act: bool) -> dict[str, torch.Tensor]:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    return gptq_tensors(quantize_int4(w, 32, sym=True, act_order_seed=1 if desc_act else None))


def test_parts_are_grouped_across_the_stream():
    parts = _gptq_layer(desc_act=True)
    stream = [
        ("model.norm.weight", torch.ones(4)),
        ("l0.g_idx", parts["g_idx"]),
        ("l0.qweight", parts["qweight"]),
        ("l0.bias", torch.zeros(16)),
        ("l0.scales", parts["scales"]),  # (a sharded checkpoint: the last part in the next file)
        ("l0.qzeros", parts["qzeros"]),
        ("l1.weight", torch.ones(3, 3)),
    ]
    method = create_quant_method("gptq", hf(GPTQ), CPU)
    out = list(quantized_weights(stream, method))
    assert [name for name, _ in out] == ["model.norm.weight", "l0.bias", "l0.weight", "l1.weight"]
    assert isinstance(out[2][1], GPTQMatrix) and out[2][1].g_idx is not None
    dequantized = list(quantized_weights(stream, create_quant_method(None, hf(GPTQ), CPU)))
    assert torch.equal(dequantized[2][1], out[2][1].dequantize())


def test_act_order_without_g_idx_is_a_typed_error():
    parts = _gptq_layer(desc_act=True)
    stream = [(f"l0.{leaf}", parts[leaf]) for leaf in ("qweight", "qzeros", "scales")]
    with pytest.raises(ModelLoadError, match="desc_act=true.*g_idx"):
        list(quantized_weights(stream, create_quant_method("gptq", hf(GPTQ), CPU)))


def test_a_missing_part_names_the_layer():
    w = torch.ones(8, 16).to(torch.float8_e4m3fn)
    method = create_quant_method("fp8", hf(FP8_BLOCKS), CPU)
    with pytest.raises(ModelLoadError, match=r"only \['weight'\] of the quantized layer 'l0'"):
        list(quantized_weights([("l0.weight", w), ("l1.input_scale", torch.tensor(1.0))], method))
    # a float layer's lone input_scale is not a missing weight
    out = list(
        quantized_weights([("l1.input_scale", torch.tensor(1.0)), ("l1.weight", torch.ones(2, 2))], method)
    )
    assert [name for name, _ in out] == ["l1.weight"] and isinstance(out[0][1], torch.Tensor)
    fp8 = list(quantized_weights([("l0.weight", w), ("l0.weight_scale_inv", torch.ones(1, 1))], method))
    assert isinstance(fp8[0][1], Fp8Matrix)


def test_late_act_order_g_idx_is_refused_when_config_says_no_act_order():
    parts = _gptq_layer(desc_act=True)
    no_act_order = create_quant_method("gptq", hf({**GPTQ, "desc_act": False}), CPU)
    stream = [(f"l0.{leaf}", parts[leaf]) for leaf in ("qweight", "qzeros", "scales", "g_idx")]
    with pytest.raises(ModelLoadError, match="desc_act=false"):
        list(quantized_weights(stream, no_act_order))
    in_order = _gptq_layer(desc_act=False)
    stream = [(f"l0.{leaf}", in_order[leaf]) for leaf in ("qweight", "qzeros", "scales", "g_idx")]
    assert [n for n, _ in quantized_weights(stream, no_act_order)] == ["l0.weight"]


def test_a_models_float_layers_stay_float():
    """A model's ``float_layers`` (MLA's absorbed ``kv_b_proj``) get float values from a quantized checkpoint, and
    online FP8 leaves them (and replicated layers) in their dtype."""
    from torch import nn

    from sgl_ray.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    from sgl_ray.layers.quantization import QuantizedWeight

    w = torch.ones(8, 16).to(torch.float8_e4m3fn)
    method = create_quant_method("fp8", hf(FP8_BLOCKS), CPU)
    parts = (("weight", w), ("weight_scale_inv", torch.ones(1, 1)))
    stream = [(f"{p}.{leaf}", t) for p in ("a.q_proj", "a.kv_b_proj") for leaf, t in parts]
    out = dict(quantized_weights(stream, method, ("kv_b_proj",)))
    assert isinstance(out["a.q_proj.weight"], Fp8Matrix) and isinstance(
        out["a.kv_b_proj.weight"], torch.Tensor
    )

    class Block(nn.Module):
        float_layers = ("kv_b_proj",)

        def __init__(self) -> None:
            super().__init__()
            self.q_proj = ColumnParallelLinear(16, 8)
            self.o_proj = RowParallelLinear(8, 16)
            self.kv_b_proj = ColumnParallelLinear(16, 8)
            self.gate = ReplicatedLinear(16, 2, False, None)
            for p in self.parameters():
                p.data.normal_()

    block = Block()
    dense = block.q_proj.weight.detach().clone()
    OnlineFP8Method().process_loaded(block)
    assert isinstance(block.q_proj.weight, QuantizedWeight) and isinstance(
        block.o_proj.weight, QuantizedWeight
    )
    assert isinstance(block.kv_b_proj.weight, nn.Parameter) and isinstance(block.gate.weight, nn.Parameter)
    assert torch.equal(block.q_proj.weight.dequantize(), Fp8Matrix.from_float(dense).dequantize())
