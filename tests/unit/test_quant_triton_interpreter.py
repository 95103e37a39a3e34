"""The INT4 (AWQ, GPTQ with act order) and FP8 (per-row, 128x128 blocks; GEMV and W8A8 GEMM) Triton kernels under
Triton's CPU interpreter, on small shapes, against the float weights their test-written checkpoints mean (the device
runs the full set in bf16/fp16: tests/quantization/test_quant_gpu.py). The interpreter handles e4m3 loads, dots
and conversions, so the FP8 kernels run here too."""

from __future__ import annotations

_SCRIPT = """
import torch
from tests.quantization.kernel_checks import check_fp8, check_gemv_launch_shapes, check_int4, check_int4_dequantize, check_int4_row_range
check_int4("cpu", torch.float32, rows_list=(1, 17), n=48)
check_int4("cpu", torch.float16, rows_list=(2, 5), n=48)
check_int4_row_range("cpu", torch.float32)
check_fp8("cpu", torch.float32, rows_list=(1, 17), n=48, schemes=("channel", "block"))
check_fp8("cpu", torch.float16, rows_list=(3,), n=48, schemes=("tensor", "block"))
check_gemv_launch_shapes("cpu", torch.float32)
check_int4_dequantize("cpu")
"""


def test_quant_kernels_in_the_interpreter(triton_interpreter) -> None:
    error = triton_interpreter.run(_SCRIPT)
    assert not error, error[-3000:]
