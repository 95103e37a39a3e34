"""The optional FlashInfer attention backend against the torch backend (fp32 reference on the same inputs), on the
cases of the Triton backend's tests: shuffled pool slots, poisoned unwritten slots, strided q/k/v views. Skipped
where flashinfer-python is not installed. FlashInfer computes in fp16/bf16 only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .test_triton_attention import HEADS, Case, check, make_batch, make_case, ragged_lens, split_qkv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
flashinfer = pytest.importorskip("flashinfer")


def run_flashinfer(case: Case) -> torch.Tensor:
    from sgl_ray.attention.flashinfer_backend import FlashInferAttentionBackend

    backend = FlashInferAttentionBackend(case.qkv.device)
    batch = make_batch(case, case.pool, backend)
    return backend.forward(*split_qkv(case), case.layer, batch)


@pytest.mark.parametrize("lens", ["b1-long", "b1-first", "b64-ragged"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_decode(lens, heads):
    seq = {
        "b1-long": np.array([4096]),
        "b1-first": np.array([1]),
        "b64-ragged": ragged_lens(64, 1, 4096, seed=1),
    }
    lengths = seq[lens]
    case = make_case(lengths - 1, np.ones_like(lengths), *heads, 128, torch.bfloat16, seed=2)
    check(case, run=run_flashinfer)


@pytest.mark.parametrize("cached", [False, True], ids=["no-prefix", "prefix"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_extend(cached, dtype):
    rng = np.random.default_rng(5)
    ext = rng.integers(2, 600, size=8)
    prefix = rng.integers(0, 3000, size=8) if cached else np.zeros(8, dtype=np.int64)
    check(make_case(prefix, ext, 32, 8, 128, dtype, seed=6), run=run_flashinfer)


def test_mixed():
    rng = np.random.default_rng(8)
    ext = np.where(rng.random(24) < 0.6, 1, rng.integers(2, 400, size=24))
    prefix = rng.integers(0, 2000, size=24)
    check(make_case(prefix, ext, 32, 8, 128, torch.bfloat16, seed=9), run=run_flashinfer)


def test_registry_names_flashinfer():
    from sgl_ray.attention import create_attention_backend
    from sgl_ray.attention.flashinfer_backend import FlashInferAttentionBackend

    assert isinstance(
        create_attention_backend("flashinfer", torch.device("cuda")), FlashInferAttentionBackend
    )
