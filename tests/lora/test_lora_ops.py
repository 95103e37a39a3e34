"""LoRA building blocks without a model: the adapter slot pool (LRU, pinning, deferred unload), batch segments,
the torch backend against a per-token reference, and the Triton kernel against the torch backend."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sgl_ray.errors import InvalidRequestError, ModelNotFoundError
from sgl_ray.lora.adapter import parse_lora_paths
from sgl_ray.lora.backend import LoRABatch, TorchLoRABackend, decode_segments
from sgl_ray.lora.pool import AdapterPool

CPU = torch.device("cpu")


def _loads(pool: AdapterPool) -> list[tuple[int, str]]:
    return [(load.slot, load.name) for load in pool.take_loads()]


def test_pool_lru_eviction_and_pinning():
    pool = AdapterPool(max_slots=2)
    for name in "abc":
        pool.register(name, f"/p/{name}")
    assert pool.acquire("a") == 0 and pool.acquire("b") == 1
    assert _loads(pool) == [(0, "a"), (1, "b")]
    assert pool.acquire("c") == -1  # both slots held by running requests
    pool.release("a")
    pool.release("b")
    pool.acquire("b")  # b is now the most recently used
    pool.release("b")
    assert pool.acquire("c") == 0 and _loads(pool) == [(0, "c")]  # evicts a (LRU), not b
    assert pool.loaded_names() == ["c", "b"]
    assert pool.acquire("b") == 1 and _loads(pool) == []  # already in its slot: no reload
    pool.release("b")
    pool.release("c")
    pool.register("p", "/p/p", pinned=True)  # loads at once, evicting the LRU (c)
    assert _loads(pool) == [(0, "p")]
    assert pool.acquire("a") == 1 and pool.acquire("b") == -1  # p is pinned, a is running
    pool.release("a")
    pool.register("q", "/p/q", pinned=True)
    with pytest.raises(InvalidRequestError, match="pinned"):
        pool.register("r", "/p/r", pinned=True)
    with pytest.raises(InvalidRequestError, match="already loaded"):
        pool.register("a", "/p/a")
    with pytest.raises(InvalidRequestError, match="name"):
        pool.register("base:x", "/p/x")


def test_pool_unregister_waits_for_users_and_reset():
    pool = AdapterPool(max_slots=2)
    pool.register("a", "/p/a")
    pool.add_user("a")
    assert pool.acquire("a") == 0
    assert pool.unregister("a") is False  # deferred
    with pytest.raises(ModelNotFoundError):
        pool.add_user("a")
    assert "a" not in pool.adapters()
    pool.release("a")
    pool.remove_user("a")  # last user gone: dropped, slot free
    assert pool.loaded_names() == [] and pool.adapters() == {}
    pool.register("a", "/p/a2", pinned=True)
    pool.take_loads()
    pool.reset_slots()  # the runner lost its weights: pinned adapters load again
    assert _loads(pool) == [(0, "a")]
    with pytest.raises(ModelNotFoundError):
        pool.unregister("zzz")


def test_batch_segments_merge_adjacent_requests():
    slots = np.array([1, 1, -1, 0, 0, 1])
    ext = np.array([1, 1, 4, 3, 1, 2])
    b = LoRABatch.from_requests(slots, ext, CPU)
    assert b.seg_start.tolist() == [0, 6, 10] and b.seg_len.tolist() == [2, 4, 2]
    assert b.seg_slot.tolist() == [1, 0, 1] and b.max_seg_len == 4
    assert b.groups[0] == (0, slice(6, 10)) and b.groups[1][1].tolist() == [0, 1, 10, 11]
    assert LoRABatch.from_requests(np.array([-1, -1]), np.array([3, 1]), CPU) is None


def test_decode_segments_are_the_runs_of_adapter_requests():
    start, length, slot = decode_segments(np.array([-1, -1, 0, 0, 0, 2, 3, 3, -1, 3]))
    assert (
        start.tolist() == [2, 5, 6, 9] and length.tolist() == [3, 1, 2, 1] and slot.tolist() == [0, 2, 3, 3]
    )
    assert all(len(r) == 0 for r in decode_segments(np.array([-1, -1])))


def _random_case(seed: int, dtype=torch.float32, device=CPU, k: int = 64):
    gen = torch.Generator().manual_seed(seed)
    slots = np.array([0, -1, 2, 2, 1, -1, 0, 3])
    ext = np.array([5, 3, 1, 1, 37, 2, 1, 16])
    t, s, n, o = int(ext.sum()), 4, 48, 80

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    return slots, ext, rnd(t, k), rnd(s, n, k), rnd(s, o, n), rnd(t, o)


def test_torch_backend_matches_per_token_reference():
    slots, ext, x, a, b, out = _random_case(0)
    expect = out.clone()
    token_slots = np.repeat(slots, ext)
    for t, s in enumerate(token_slots):
        if s >= 0:
            expect[t] += (x[t] @ a[s].T) @ b[s].T
    TorchLoRABackend().apply(x, out, a, b, LoRABatch.from_requests(slots, ext, CPU))
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)


def test_parse_lora_paths():
    assert parse_lora_paths(["x=/a/b", "/c/d/"]) == {"x": "/a/b", "d": "/c/d"}
    with pytest.raises(InvalidRequestError):
        parse_lora_paths(["=/a"])


_INTERPRET = """
import numpy as np, torch
from sgl_ray.lora.backend import GraphLoRABatch, LoRABatch, TorchLoRABackend, decode_segments
from sgl_ray.lora.triton_backend import TritonLoRABackend
from tests.lora.test_lora_ops import _random_case
for k in (64, 1100):  # 1100: the shrink splits K over 3 programs
    tol = dict(rtol=1e-4, atol=1e-4 * k / 64)  # fp32 sums of k products, in another order than torch's
    slots, ext, x, a, b, out = _random_case(1, k=k)
    batch = LoRABatch.from_requests(slots, ext, torch.device("cpu"))
    ref = out.clone()
    TorchLoRABackend().apply(x, ref, a, b, batch)
    TritonLoRABackend().apply(x, out, a, b, batch)
    torch.testing.assert_close(out, ref, **tol)
    # a decode batch as a CUDA graph replays it: fixed grid over 6 segment entries, unused ones of length 0
    dslots = np.array([-1, -1, 0, 0, 0, 2, 3, 3])
    x, out = x[: len(dslots)], out[: len(dslots)]
    ref = out.clone()
    TorchLoRABackend().apply(x, ref, a, b, LoRABatch.from_requests(dslots, np.ones(8, np.int64), torch.device("cpu")))
    segs = torch.zeros(3, 6, dtype=torch.int64)
    runs = decode_segments(dslots)
    segs[:, : len(runs[0])] = torch.from_numpy(np.stack(runs))
    TritonLoRABackend().apply(x, out, a, b, GraphLoRABatch(segs[0], segs[1], segs[2], max_seg_len=16))
    torch.testing.assert_close(out, ref, **tol)
"""


def test_triton_kernel_in_the_interpreter():
    """The SGMV kernel's indexing and masking, run by Triton's CPU interpreter (no GPU needed)."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRET], env=env, capture_output=True, text=True, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 4096])  # 4096: the shrink splits K
def test_triton_backend_matches_torch_on_gpu(dtype, k):
    from sgl_ray.lora.triton_backend import TritonLoRABackend

    dev = torch.device("cuda")
    slots, ext, x, a, b, out = _random_case(2, dtype, dev, k=k)
    a, b = a * 0.1 * (64 / k) ** 0.5, b * 0.1
    batch = LoRABatch.from_requests(slots, ext, dev)
    ref = out.float().clone()
    TorchLoRABackend().apply(x.float(), ref, a.float(), b.float(), batch)
    TritonLoRABackend().apply(x, out, a, b, batch)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    # a strided activation (a column slice of a fused tensor), as the models pass it
    wide = torch.randn(x.shape[0], x.shape[1] * 2, device=dev, dtype=dtype)
    xs = wide[:, 1 : 1 + x.shape[1]]
    ref2, out2 = out.float().clone(), out.clone()
    TorchLoRABackend().apply(xs.float(), ref2, a.float(), b.float(), batch)
    TritonLoRABackend().apply(xs, out2, a, b, batch)
    torch.testing.assert_close(out2.float(), ref2, rtol=tol, atol=tol)


def test_serve_cli_lora_flags_reach_the_app_args():
    from sgl_ray.cli import build_parser
    from sgl_ray.deployments.serve_cli import app_args

    ns = build_parser().parse_args(
        [
            "serve",
            "--lora-paths",
            "sql=/a/sql",
            "chat=/b/chat",
            "--max-lora-rank",
            "32",
            "--max-loras-per-batch",
            "4",
        ]
    )
    args = app_args(ns)
    assert args["lora_paths"] == ("sql=/a/sql", "chat=/b/chat")
    assert args["max_lora_rank"] == 32 and args["max_loras_per_batch"] == 4
    from sgl_ray.configs.engine_args import EngineArgs

    serve_only = {"num_replicas", "router", "routing_imbalance"}
    engine = EngineArgs(**{k: v for k, v in args.items() if k not in serve_only})
    assert engine.lora_enabled and engine.lora_paths == ("sql=/a/sql", "chat=/b/chat")
    with pytest.raises(InvalidRequestError):
        EngineArgs(max_loras_per_batch=0)
