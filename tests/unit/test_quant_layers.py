"""INT4 (AWQ, GPTQ with act order) and FP8 weights in the layers: the product equals dequantize-then-matmul; fused
projections stack their pieces; tensor-parallel shards (two ranks, loaded in-process) cut INT4 along the output for
column-parallel layers and along the input in whole groups for row-parallel ones, and together compute the whole
layer's product; a split inside a group names the option; LoRA adds to the quantized base's product."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    linear,
)
from sgl_ray.layers.quantization import QuantizedWeight, weight_nbytes
from sgl_ray.layers.quantization import weight as weight_module

from ..quantization.kernel_checks import fp8_case, int4_case
from .ranks import RankOf

K = 256
ENCODINGS = {  # name -> (rows, cols, seed) -> (matrix, reference)
    "awq": lambda n, k, seed: int4_case("awq", n, k, 64, seed=seed),
    "gptq-act-order": lambda n, k, seed: int4_case("gptq", n, k, 32, act_order=True, seed=seed),
    "fp8-blocks": lambda n, k, seed: fp8_case("block", n, k, seed=seed),
    "fp8-online": lambda n, k, seed: fp8_case("online", n, k, seed=seed),
}


def assert_product_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``got`` is ``F.linear(x, w)`` up to float32 summation order."""
    scale = F.linear(x.abs(), w.abs()).max().item() + 1.0
    torch.testing.assert_close(got, F.linear(x, w), rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_product_in_slabs_equals_dequantize_then_matmul(encoding, monkeypatch):
    monkeypatch.setattr(weight_module, "SLAB_VALUES", 7 * K)  # several slabs, the last one short
    matrix, reference = ENCODINGS[encoding](40, K, 0)
    layer = ReplicatedLinear(K, 40, False, None)
    layer.weight_loader(layer.weight, matrix)
    assert isinstance(layer.weight, QuantizedWeight) and layer.weight.kinds == [matrix.kind]
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
    assert_product_close(layer(x), x, reference)
    assert weight_nbytes(layer) == matrix.nbytes


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_tensor_parallel_shards_compute_the_whole_product(encoding):
    make = ENCODINGS[encoding]
    pieces = {
        name: make(rows, K, seed) for seed, (name, rows) in enumerate((("q", 128), ("k", 64), ("v", 64)))
    }
    gate, up = make(96, K, 7), make(96, K, 8)
    down = make(96, K, 9)  # row-parallel: each rank takes 128 input columns (whole groups and blocks)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(2))
    h = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    qkv_out, gate_up_out, down_sum = [], [], 0
    for rank in range(2):
        tp = RankOf(rank, 2)
        qkv = QKVParallelLinear(K, 32, 4, 2, False, tp)
        for name, (matrix, _) in pieces.items():
            qkv.weight_loader(qkv.weight, matrix, name)
        gate_up = MergedColumnParallelLinear(K, [96, 96], False, tp)
        gate_up.weight_loader(gate_up.weight, gate[0], 0)
        gate_up.weight_loader(gate_up.weight, up[0], 1)
        row = RowParallelLinear(K, 96, False, tp)
        row.weight_loader(row.weight, down[0])
        for layer in (qkv, gate_up, row):
            assert isinstance(layer.weight, QuantizedWeight)
        qkv_out.append(qkv(x).split([64, 32, 32], dim=1))  # this rank's q heads, its kv head
        gate_up_out.append(gate_up(x).split([48, 48], dim=1))
        down_sum = down_sum + linear(h[:, rank * 128 : (rank + 1) * 128], row.weight)  # before the all-reduce
    for i, name in enumerate(("q", "k", "v")):
        assert_product_close(torch.cat([out[i] for out in qkv_out], dim=1), x, pieces[name][1])
    assert_product_close(torch.cat([out[0] for out in gate_up_out], dim=1), x, gate[1])
    assert_product_close(torch.cat([out[1] for out in gate_up_out], dim=1), x, up[1])
    assert_product_close(down_sum, h, down[1])


def test_fused_pieces_of_one_encoding_are_one_segment():
    qkv = QKVParallelLinear(K, 32, 4, 2, False, None)
    for seed, (name, rows) in enumerate((("q", 128), ("k", 64), ("v", 64))):
        qkv.weight_loader(qkv.weight, ENCODINGS["awq"](rows, K, seed)[0], name)
    assert qkv.weight.kinds == ["AWQ"]
    mixed = QKVParallelLinear(K, 32, 4, 2, False, None)
    mixed.weight_loader(mixed.weight, ENCODINGS["awq"](128, K, 0)[0], "q")
    mixed.weight_loader(mixed.weight, ENCODINGS["fp8-online"](64, K, 1)[0], "k")
    mixed.weight_loader(mixed.weight, torch.zeros(64, K), "v")  # an unquantized piece
    assert mixed.weight.kinds == ["AWQ", "FP8", "dense"]


def test_row_parallel_split_inside_a_group_names_the_option():
    matrix, _ = int4_case("awq", 32, K, 128)  # groups of 128 columns: four ranks would take 64 each
    row = RowParallelLinear(K, 32, False, RankOf(1, 4))
    with pytest.raises(UnsupportedModelError, match="quantization='none'"):
        row.weight_loader(row.weight, matrix)


@pytest.mark.parametrize("encoding", ["awq", "fp8-blocks"])
def test_lora_adds_to_the_quantized_base_product(encoding):
    from sgl_ray.lora.backend import LoRABatch, create_lora_backend
    from sgl_ray.lora.layers import ColumnLoRALinear, LoRAContext, RowLoRALinear

    ctx = LoRAContext(create_lora_backend("torch", torch.device("cpu")))
    matrix, reference = ENCODINGS[encoding](K, K, 4)
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, K, generator=gen), torch.randn(K, 4, generator=gen)
    x = torch.randn(3, K, generator=gen)
    ctx.batch = LoRABatch(np.array([0]), np.array([3]), np.array([0]), torch.device("cpu"))
    for cls, wrapper_cls, module in (
        (ReplicatedLinear, ColumnLoRALinear, "q_proj"),
        (RowParallelLinear, RowLoRALinear, "o_proj"),
    ):
        base = cls(K, K, False, None)
        base.weight_loader(base.weight, matrix)
        wrapper = wrapper_cls(base, {module: None}, ctx, num_slots=1, max_rank=4)
        wrapper.load_slot(0, module, a, b)
        assert isinstance(base.weight, QuantizedWeight) and not isinstance(base.weight, nn.Parameter)
        assert_product_close(wrapper(x), x, reference + b @ a)
