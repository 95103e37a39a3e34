"""The GPU attention backends to parametrize engine tests over: Triton, and FlashInfer where it is installed."""

from __future__ import annotations

import importlib.util

import pytest

HAVE_FLASHINFER = importlib.util.find_spec("flashinfer") is not None

ATTENTION_BACKENDS = [
    "triton",
    pytest.param(
        "flashinfer",
        marks=pytest.mark.skipif(not HAVE_FLASHINFER, reason="flashinfer-python is not installed"),
    ),
]
