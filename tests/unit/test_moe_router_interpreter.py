"""The fused top-k router kernels (alone, and with the router's GEMV) in Triton's CPU interpreter (its checks: ``tests/gpu/test_moe_router.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
from tests.gpu.test_moe_router import CONFIGS, check_gate_router, check_router
for config in CONFIGS:
    check_router("cpu", config)
    check_gate_router("cpu", config)
"""


def test_router_kernel_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
