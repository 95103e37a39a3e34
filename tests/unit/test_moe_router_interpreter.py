"""The fused top-k router kernels (alone, and with the router's GEMV) in Triton's CPU interpreter (its checks: ``tests/gpu/test_moe_router.py``)."""

from __future__ import annotations

_SCRIPT = """
from tests.gpu.test_moe_router import CONFIGS, check_gate_router, check_router, check_router_ties
for config in CONFIGS:
    check_router("cpu", config)
    check_gate_router("cpu", config)
    if not config.correction_bias:
        check_router_ties("cpu", config)
"""


def test_router_kernel_in_the_interpreter(triton_interpreter):
    error = triton_interpreter.run(_SCRIPT)
    assert not error, error[-3000:]
