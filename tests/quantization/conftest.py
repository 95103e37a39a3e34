"""Fixtures of the quantization tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """One torch thread while a module of these tests runs (restored after): the tiny models' ops are far shorter
    than an OpenMP hand-off, and on a shared 2-core machine two threads made them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
