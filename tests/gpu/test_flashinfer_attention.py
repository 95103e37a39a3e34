"""The optional FlashInfer attention backend against the torch backend (fp32 reference on the same inputs), on the
cases of the Triton backend's tests: shuffled pool slots, poisoned unwritten slots, strided q/k/v views. Skipped
where flashinfer-python is not installed. FlashInfer computes in fp16/bf16 only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .test_triton_attention import (
    HEADS,
    Case,
    check,
    make_batch,
    make_case,
    ragged_lens,
    reference,
    split_qkv,
)

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


@pytest.mark.parametrize("kwargs", [dict(sliding_window=128), dict(sinks=True)], ids=["window", "sinks"])
def test_windows_and_sinks_are_refused(kwargs):
    """A sliding-window or sink layer raises at its first forward, naming the Triton backend."""
    from sgl_ray.errors import UnsupportedModelError

    case = make_case(np.array([10, 3]), np.array([1, 5]), 8, 2, 64, torch.bfloat16, seed=1, **kwargs)
    with pytest.raises(UnsupportedModelError, match="triton"):
        run_flashinfer(case)


def test_registry_names_flashinfer():
    from sgl_ray.attention import create_attention_backend
    from sgl_ray.attention.flashinfer_backend import FlashInferAttentionBackend

    assert isinstance(
        create_attention_backend("flashinfer", torch.device("cuda")), FlashInferAttentionBackend
    )


def test_decode_replayed_from_a_cuda_graph():
    """Decode captured once in a CUDA graph for 8 rows over static buffers, as the graph runner does, then replayed
    for 5 requests (3 padding rows) and for 8 with other lengths: each replay is planned again for its lengths
    (``prepare_graph_replay``) and matches the torch backend on the real rows."""
    from sgl_ray.attention.flashinfer_backend import FlashInferAttentionBackend
    from sgl_ray.runner.forward_batch import ForwardBatch

    gbs, dev = 8, torch.device("cuda")
    lengths = ragged_lens(gbs, 1, 3000, seed=3)
    full = make_case(lengths - 1, np.ones(gbs, dtype=np.int64), 32, 8, 128, torch.bfloat16, seed=4)
    steps = []
    for n in (5, 8):
        sub = Case(
            full.prefix_lens[:n], full.extend_lens[:n], full.slots[:n], full.req_pool_idxs[:n],
            full.req_to_token, full.out_cache_loc[:n], full.pool, full.qkv[:n], full.layer,
        )  # fmt: skip
        steps.append((n, reference(sub)))  # before any replay stores new K/V

    backend = FlashInferAttentionBackend(dev)
    req = torch.zeros(gbs, dtype=torch.int64, device=dev)
    seq = torch.ones(gbs, dtype=torch.int64, device=dev)
    loc = torch.zeros(gbs, dtype=torch.int64, device=dev)
    qkv = torch.zeros_like(full.qkv)
    rows = torch.arange(gbs, device=dev)
    batch = ForwardBatch(
        input_ids=torch.zeros(gbs, dtype=torch.int64, device=dev), positions=seq - 1, out_cache_loc=loc,
        req_pool_idxs=req, seq_lens=seq, extend_start_loc=rows, logits_indices=rows,
        prefix_lens_cpu=np.zeros(gbs, dtype=np.int64), extend_lens_cpu=np.ones(gbs, dtype=np.int64),
        kv_pool=full.pool, req_to_token=full.req_to_token, attn_backend=backend,
    )  # fmt: skip
    batch.attn_metadata = backend.graph_metadata(batch, full.req_to_token.shape[1])
    q, k, v = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            backend.forward(q, k, v, full.layer, batch)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = backend.forward(q, k, v, full.layer, batch)

    for n, expected in steps:
        host_seq = np.ones(gbs, dtype=np.int64)
        host_seq[:n] = full.prefix_lens[:n] + 1
        req.zero_()[:n] = full.req_pool_idxs[:n]
        seq.copy_(torch.from_numpy(host_seq))
        loc.zero_()[:n] = full.out_cache_loc[:n]
        qkv.zero_()[:n] = full.qkv[:n]
        backend.prepare_graph_replay(batch.attn_metadata, host_seq)
        graph.replay()
        got = out[:n].float()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
