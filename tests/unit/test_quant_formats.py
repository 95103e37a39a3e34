"""AWQ, GPTQ and FP8 checkpoint tensors (written by tests/quantization/packing.py from float weights) decode to
exactly the float weights they mean, row ranges and row subsets on their own; they hold the bytes their encodings
say (INT4: half a byte a weight plus a scale and a zero point per group and row; FP8: a byte plus a float32 scale
per row and block); and column ranges are cut only on whole groups or blocks."""

from __future__ import annotations

import pytest
import torch

from sgl_ray.layers.quantization import Fp8Matrix, GPTQMatrix
from sgl_ray.layers.quantization.int4 import pack_int4, unpack_int4
from sgl_ray.layers.quantization.int4_formats import gptq_matrix

from ..quantization.kernel_checks import fp8_case, int4_case
from ..quantization.packing import fp8_blocks, gptq_tensors, quantize_int4

INT4_CASES = [  # (format, group size, act order)
    ("awq", 32, False),
    ("awq", 128, False),
    ("gptq", 64, False),  # v1, symmetric
    ("gptq", 32, True),  # v1, act order
    ("gptq_v2", 32, False),  # asymmetric, zero points 0..15
]


@pytest.mark.parametrize("fmt,group,act_order", INT4_CASES)
def test_int4_checkpoint_decodes_to_what_it_means(fmt, group, act_order):
    matrix, reference = int4_case(fmt, 40, 256, group, act_order)
    assert matrix.kind == ("AWQ" if fmt == "awq" else "GPTQ")
    assert (matrix.g_idx is not None) == act_order
    assert torch.equal(matrix.dequantize(), reference)
    assert torch.equal(matrix.dequantize(8, 21), reference[8:21])
    index = torch.tensor([39, 0, 17, 17])
    assert torch.equal(matrix.take_rows(index), reference[index])
    groups = 256 // group
    extra = 256 * 4 if act_order else 0  # the act-order g_idx, int32 per column
    assert matrix.nbytes == 40 * 256 // 2 + 40 * groups * (2 + 1) + extra


def test_gptq_v1_asymmetric_zero_points_are_stored_minus_one():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    gq = quantize_int4(w, 32, min_zero=1)  # v1 cannot store a zero point of 0
    t = gptq_tensors(gq, v1=True)
    m = gptq_matrix(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 32, zero_offset=1)
    assert torch.equal(m.dequantize(), gq.dequantized())
    assert torch.equal(m.zeros.t().long(), gq.zeros)


def test_gptq_one_group_per_row():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)) * 0.05
    gq = quantize_int4(w, 64)
    t = gptq_tensors(gq, v1=False)
    m = gptq_matrix(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], -1, zero_offset=0)
    assert isinstance(m, GPTQMatrix) and m.groups == 1 and m.g_idx is None
    assert torch.equal(m.dequantize(), gq.dequantized())
    assert m.col_align == 8  # one group: any whole number of words is a shard
    assert torch.equal(m.narrow(1, 16, 24).dequantize(), gq.dequantized()[:, 16:40])


def test_pack_and_unpack_are_inverse():
    values = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(5))
    assert torch.equal(unpack_int4(pack_int4(values)).long(), values)


def test_int4_column_shards_take_whole_groups():
    matrix, reference = int4_case("awq", 24, 256, 64)
    shard = matrix.narrow(1, 128, 64)
    assert torch.equal(shard.dequantize(), reference[:, 128:192])
    assert shard.groups == 1 and shard.nbytes == 24 * 32 + 24 * 3
    with pytest.raises(ValueError, match="64-column groups"):
        matrix.narrow(1, 32, 64)
    act, act_reference = int4_case("gptq", 24, 256, 64, act_order=True)
    assert act.col_align == 8  # act order: every group's scales stay with each shard
    assert torch.equal(act.narrow(1, 40, 96).dequantize(), act_reference[:, 40:136])


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block", "online"])
def test_fp8_checkpoint_decodes_to_what_it_means(scheme):
    matrix, reference = fp8_case(scheme, 200, 256)  # 200 rows: a partial 128-row block
    assert isinstance(matrix, Fp8Matrix)
    assert torch.equal(matrix.dequantize(), reference)
    assert torch.equal(matrix.dequantize(120, 140), reference[120:140])  # across a block edge
    index = torch.tensor([199, 3, 128])
    assert torch.equal(matrix.take_rows(index), reference[index])
    blocks = 2 if scheme == "block" else 1
    assert matrix.nbytes == 200 * 256 + 200 * blocks * 4


def test_fp8_block_column_shards():
    w = torch.randn(64, 384, generator=torch.Generator().manual_seed(6)) * 0.05
    tensors, reference = fp8_blocks(w, 128)
    m = Fp8Matrix.from_checkpoint(tensors["weight"], tensors["weight_scale_inv"], (128, 128))
    assert torch.equal(m.narrow(1, 128, 256).dequantize(), reference[:, 128:])
    with pytest.raises(ValueError, match="128-column blocks"):
        m.narrow(1, 64, 128)
    per_row = Fp8Matrix.from_float(w)  # one scale per row: any column range
    assert torch.equal(per_row.narrow(1, 5, 100).dequantize(), per_row.dequantize()[:, 5:105])


def test_fp8_online_quantization_keeps_each_row_in_range():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(7)) * torch.logspace(-3, 2, 16)[:, None]
    m = Fp8Matrix.from_float(w)
    # each row's largest value maps to e4m3's largest
    assert m.weight.float().abs().amax(dim=1).eq(448.0).all()
    # 3 mantissa bits: half a step of the largest binade, relative to the row's largest value
    rel = ((m.dequantize() - w).abs() / w.abs().amax(dim=1, keepdim=True)).max()
    assert rel < 2**-4
