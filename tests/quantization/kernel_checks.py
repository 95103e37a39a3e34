"""The INT4 and FP8 Triton kernels against the float weights their checkpoints mean (written by
:mod:`tests.quantization.packing`). Run on CUDA by tests/quantization/test_quant_gpu.py and on the CPU under Triton's
interpreter by tests/unit/test_quant_triton_interpreter.py (small shapes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sgl_ray.layers.quantization.fp8 import Fp8Matrix
from sgl_ray.layers.quantization.int4_formats import awq_matrix, gptq_matrix

from .packing import awq_tensors, fp8_blocks, fp8_per_channel, fp8_per_tensor, gptq_tensors, quantize_int4

# Relative to the largest |x| @ |W|.T of a case: float32 summation order; one rounding of a 16-bit output.
REL_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _assert_close(
    got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, what: str, dtype: torch.dtype | None = None
) -> None:
    """``got`` is ``x @ w.T`` up to the tolerance of ``dtype`` (default ``x``'s)."""
    want = F.linear(x.float(), w.float())
    scale = F.linear(x.float().abs(), w.float().abs()).max().item() + 1e-6
    err = (got.float() - want).abs().max().item()
    assert err <= REL_TOL[dtype or x.dtype] * scale, f"{what}: max error {err:.3g} of {scale:.3g}"


def int4_case(fmt: str, n: int, k: int, group: int, act_order: bool = False, seed: int = 0):
    """``(matrix, reference float [n, k])`` for ``fmt`` "awq", "gptq" (v1, sym) or "gptq_v2" (asymmetric)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if fmt == "awq":
        gq = quantize_int4(w, group)
        t = awq_tensors(gq)
        return awq_matrix(t["qweight"], t["qzeros"], t["scales"], group), gq.dequantized()
    v1 = fmt == "gptq"
    gq = quantize_int4(w, group, sym=v1, act_order_seed=seed if act_order else None)
    t = gptq_tensors(gq, v1=v1)
    return gptq_matrix(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group, int(v1)), gq.dequantized()


def fp8_case(scheme: str, n: int, k: int, seed: int = 0):
    """``(matrix, reference float [n, k])`` for ``scheme`` "tensor", "channel", "block" (128x128) or "online"."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    if scheme == "online":
        m = Fp8Matrix.from_float(w)
        return m, m.dequantize()
    make = {"tensor": fp8_per_tensor, "channel": fp8_per_channel, "block": fp8_blocks}[scheme]
    tensors, reference = make(w)
    scale = tensors.get("weight_scale_inv", tensors.get("weight_scale"))
    return Fp8Matrix.from_checkpoint(
        tensors["weight"], scale, (128, 128) if scheme == "block" else None
    ), reference


def check_int4(device: str, dtype: torch.dtype, rows_list=(1, 3, 5, 33), n: int = 80, k: int = 256) -> None:
    """Both INT4 kernels (GEMV for up to 4 rows, GEMM above) for AWQ and GPTQ (v1 with act order, v2), group sizes
    32, 64 and 128, against the reference weights."""
    from sgl_ray.layers.quantization.triton_int4 import int4_linear

    cases = [("awq", 32, False), ("gptq", 64, True), ("gptq_v2", 128, False), ("awq", 128, False)]
    for fmt, group, act_order in cases:
        matrix, reference = int4_case(fmt, n, k, group, act_order)
        m = matrix.to(torch.device(device))
        assert (m.g_idx is not None) == act_order
        for rows in rows_list:
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(device, dtype)
            got = int4_linear(x, m.qweight, m.scales, m.zeros, m.group_size, m.g_idx)
            assert got.dtype == dtype and got.shape == (rows, n)
            _assert_close(got.cpu(), x.cpu(), reference, f"{fmt} group {group} rows {rows}")


def check_int4_row_range(device: str, dtype: torch.dtype) -> None:
    """A slab of rows (``matmul(x, start, end)``) and a column shard (whole groups) give their part of the product."""
    matrix, reference = int4_case("awq", 96, 256, 64)
    m = matrix.to(torch.device(device))
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    _assert_close(m.matmul(x, 16, 80).cpu(), x.cpu(), reference[16:80], "rows 16:80")
    shard = m.narrow(1, 128, 128)
    _assert_close(
        shard.matmul(x[:, 128:], 0, 96).cpu(), x[:, 128:].cpu(), reference[:, 128:], "columns 128:256"
    )


def check_fp8(
    device: str,
    dtype: torch.dtype,
    rows_list=(1, 3, 5, 33),
    n: int = 80,
    k: int = 256,
    schemes=("tensor", "channel", "block", "online"),
) -> None:
    """The FP8 GEMV (weight-only, up to 4 rows) and the W8A8 GEMM (2 rows and more), per-row and 128x128 block
    scales. The GEMM is compared with the product of the activations as it quantizes them
    (``quantize_activations``) and the reference weights."""
    from sgl_ray.layers.quantization.triton_fp8 import fp8_linear, quantize_activations

    for scheme in schemes:
        matrix, reference = fp8_case(scheme, n, k)
        m = matrix.to(torch.device(device))
        for rows in rows_list:
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(device, dtype)
            if rows <= 4:
                got = fp8_linear(x, m.weight, m.scale, m.block_k, w8a8=False)
                _assert_close(got.cpu(), x.cpu(), reference, f"fp8 gemv {scheme} rows {rows}")
            if rows == 1:
                continue
            got = fp8_linear(x, m.weight, m.scale, m.block_k, w8a8=True)
            xq, xs = quantize_activations(x, m.block_k)
            x_seen = (xq.float().view(rows, xs.shape[1], -1) * xs.unsqueeze(-1)).view(rows, k)
            _assert_close(got.cpu(), x_seen.cpu(), reference, f"fp8 gemm {scheme} rows {rows}", dtype)


def check_gemv_launch_shapes(device: str, dtype: torch.dtype) -> None:
    """The one-row INT4 and FP8 GEMVs in launch shapes other than their defaults (rows per program that do not
    divide N, steps longer than K, one row per program), as ``--tune`` may put them in the tables."""
    from sgl_ray.layers.quantization.triton_fp8 import Fp8GemvConfig, fp8_linear
    from sgl_ray.layers.quantization.triton_int4 import Int4GemvConfig, int4_linear

    x = torch.randn(2, 320, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    for cfg in (Int4GemvConfig(16, 16, 1, 2), Int4GemvConfig(1, 64, 1, 1), Int4GemvConfig(4, 32, 2, 3)):
        matrix, reference = int4_case("awq", 40, 320, 32)
        m = matrix.to(torch.device(device))
        got = int4_linear(x, m.qweight, m.scales, m.zeros, m.group_size, None, cfg)
        _assert_close(got.cpu(), x.cpu(), reference, f"int4 gemv {cfg}")
    for scheme in ("channel", "block"):
        matrix, reference = fp8_case(scheme, 37, 320)
        m = matrix.to(torch.device(device))
        for cfg in (Fp8GemvConfig(2, 64, 1, 2), Fp8GemvConfig(16, 512, 1, 2), Fp8GemvConfig(1, 256, 2, 3)):
            got = fp8_linear(x, m.weight, m.scale, m.block_k, w8a8=False, config=cfg)
            _assert_close(got.cpu(), x.cpu(), reference, f"fp8 gemv {scheme} {cfg}")


def check_int4_dequantize(device: str) -> None:
    """The dequantizing kernel (the many-row products' first step) gives the reference weights exactly, with and
    without act order."""
    from sgl_ray.layers.quantization.triton_int4 import int4_dequantize

    for fmt, group, act_order in [("awq", 32, False), ("gptq", 64, True), ("gptq_v2", 128, False)]:
        matrix, reference = int4_case(fmt, 40, 256, group, act_order)
        m = matrix.to(torch.device(device))
        w = int4_dequantize(m.qweight, m.scales, m.zeros, m.group_size, m.g_idx, torch.float32)
        torch.testing.assert_close(w.cpu(), reference, atol=0, rtol=0)
