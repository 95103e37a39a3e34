"""The Triton attention backend against the torch backend (fp32 reference on the same inputs); layers with a
sliding window and/or attention sinks are checked against a dense softmax written here (``dense_reference``), in
``test_triton_attention_window.py``.

Every case lays its requests' tokens on shuffled, non-contiguous pool slots (``req_to_token`` rows in shuffled table
rows), poisons every slot nothing has written (and the backend's output and scratch buffers) with NaN, and reads
q/k/v as strided views of one fused qkv tensor, as the models produce them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sgl_ray.attention import create_attention_backend, default_backend_name
from sgl_ray.attention.torch_backend import TorchAttentionBackend
from sgl_ray.layers.attention import RadixAttention
from sgl_ray.mem_cache.kv_pool import KVPool
from sgl_ray.runner.forward_batch import ForwardBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LAYER_ID = 1  # of 2: the other layer's buffers must stay untouched
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # atol = rtol
HEADS = [(8, 8), (16, 4), (32, 4)]  # (query heads, kv heads): GQA ratios 1, 4, 8


@dataclass
class Case:
    prefix_lens: np.ndarray  # [B]
    extend_lens: np.ndarray  # [B]
    slots: list[torch.Tensor]  # per request, [seq_len] pool slots
    req_pool_idxs: torch.Tensor  # [B]
    req_to_token: torch.Tensor  # [max_reqs, max_context]
    out_cache_loc: torch.Tensor  # [T]
    pool: KVPool  # prefix K/V written, everything else NaN (slot 0 zero)
    qkv: torch.Tensor  # [T, (H + 2 * KVH) * D]
    layer: RadixAttention


def make_case(
    prefix_lens,
    extend_lens,
    num_heads,
    num_kv_heads,
    head_dim,
    dtype,
    device="cuda",
    seed=0,
    sliding_window: int | None = None,
    sinks: bool = False,
    logit_cap: float | None = None,
) -> Case:
    gen = torch.Generator(device).manual_seed(seed)
    prefix = np.asarray(prefix_lens, dtype=np.int64)
    ext = np.asarray(extend_lens, dtype=np.int64)
    seq = prefix + ext
    total = int(seq.sum())
    num_slots = 1 + total + total // 4 + 8  # spare slots stay poisoned
    perm = 1 + torch.randperm(num_slots - 1, generator=gen, device=device)
    bounds = np.concatenate(([0], np.cumsum(seq)))
    slots = [perm[bounds[r] : bounds[r + 1]] for r in range(len(seq))]
    max_reqs = len(seq) + 5
    req_pool_idxs = torch.randperm(max_reqs, generator=gen, device=device)[: len(seq)]
    req_to_token = torch.zeros((max_reqs, int(seq.max()) + 16), dtype=torch.int64, device=device)
    for r, s in enumerate(slots):
        req_to_token[req_pool_idxs[r], : len(s)] = s  # the runner writes new tokens' slots before the forward
    pool = KVPool(num_slots, 2, num_kv_heads, head_dim, dtype, device)
    for buf in pool.k_buffers + pool.v_buffers:
        buf.fill_(math.nan)
        buf[0].zero_()
    cached = torch.cat([s[:p] for s, p in zip(slots, prefix, strict=True)])
    for buf in (pool.k_buffers[LAYER_ID], pool.v_buffers[LAYER_ID]):
        values = torch.randn((len(cached), num_kv_heads, head_dim), generator=gen, device=device)
        buf[cached] = values.to(dtype)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn((int(ext.sum()), width), generator=gen, device=device).to(dtype)
    layer = RadixAttention(
        num_heads,
        head_dim,
        head_dim**-0.5,
        num_kv_heads,
        LAYER_ID,
        sliding_window=sliding_window,
        sinks=sinks,
        logit_cap=logit_cap,
    ).to(device)
    if sinks:  # from negligible to dominant next to the ~N(0, 1) scores of a few hundred keys
        layer.sinks.data = (torch.randn(num_heads, generator=gen, device=device) * 3 + 2).to(dtype)
    out_cache_loc = torch.cat([s[p:] for s, p in zip(slots, prefix, strict=True)])
    return Case(prefix, ext, slots, req_pool_idxs, req_to_token, out_cache_loc, pool, qkv, layer)


def split_qkv(case: Case, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    qkv = case.qkv if dtype is None else case.qkv.to(dtype)
    layer = case.layer
    sizes = [layer.num_heads * layer.head_dim, *[layer.num_kv_heads * layer.head_dim] * 2]
    return qkv.split(sizes, dim=1)  # strided views, like a fused projection's


def make_batch(case: Case, pool: KVPool, backend) -> ForwardBatch:
    ext, prefix = case.extend_lens, case.prefix_lens
    dev = case.qkv.device
    starts = np.concatenate(([0], np.cumsum(ext)[:-1]))
    num_tokens = int(ext.sum())
    batch = ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=dev),
        positions=torch.from_numpy(np.repeat(prefix - starts, ext) + np.arange(num_tokens)).to(dev),
        out_cache_loc=case.out_cache_loc,
        req_pool_idxs=case.req_pool_idxs,
        seq_lens=torch.from_numpy(prefix + ext).to(dev),
        extend_start_loc=torch.from_numpy(starts).to(dev),
        logits_indices=torch.from_numpy(starts + ext - 1).to(dev),
        prefix_lens_cpu=prefix,
        extend_lens_cpu=ext,
        kv_pool=pool,
        req_to_token=case.req_to_token,
        attn_backend=backend,
    )
    backend.init_forward_metadata(batch)
    return batch


def nan_buffers(backend):
    """Make every output/scratch buffer the backend allocates start as NaN."""
    backend._new_buffer = lambda shape, dtype: torch.full(shape, math.nan, dtype=dtype, device=backend.device)
    return backend


def reference(case: Case) -> torch.Tensor:
    """The torch backend in fp32 on the same (upcast) inputs."""
    src = case.pool
    pool = KVPool(src.num_slots, 2, case.layer.num_kv_heads, case.layer.head_dim, torch.float32, src.device)
    pool.k_buffers = [b.float() for b in src.k_buffers]
    pool.v_buffers = [b.float() for b in src.v_buffers]
    backend = TorchAttentionBackend(src.device)
    batch = make_batch(case, pool, backend)
    with sdpa_kernel(SDPBackend.MATH):  # plain fp32 matmuls, no reduced-precision kernel
        return backend.forward(*split_qkv(case, torch.float32), case.layer, batch)


def dense_reference(case: Case) -> torch.Tensor:
    """Attention written out per request in fp64, as transformers' eager GPT-OSS and Gemma 2 attention: scores of
    every key of the sequence, soft-capped (``cap * tanh(s / cap)``) with a cap, masked (causal, and
    ``i - window < j`` with a window) with -inf, the sink logit concatenated as a last column, softmax, the sink
    column dropped. [T, H * D] in fp32."""
    layer = case.layer
    h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q_all, k_all, v_all = (t.double() for t in split_qkv(case))
    k_pool, v_pool = case.pool.k_buffers[LAYER_ID].double(), case.pool.v_buffers[LAYER_ID].double()
    outs, row = [], 0
    for slots, prefix, n in zip(case.slots, case.prefix_lens, case.extend_lens, strict=True):
        prefix, n = int(prefix), int(n)
        new = slice(row, row + n)
        k = torch.cat([k_pool[slots[:prefix]], k_all[new].reshape(n, kvh, d)])  # [S, KVH, D]
        v = torch.cat([v_pool[slots[:prefix]], v_all[new].reshape(n, kvh, d)])
        k = k.transpose(0, 1).repeat_interleave(h // kvh, dim=0)  # [H, S, D], transformers' repeat_kv
        v = v.transpose(0, 1).repeat_interleave(h // kvh, dim=0)
        q = q_all[new].reshape(n, h, d).transpose(0, 1)  # [H, n, D]
        scores = q @ k.transpose(1, 2) * layer.scaling  # [H, n, S]
        if layer.logit_cap is not None:
            scores = torch.tanh(scores / layer.logit_cap) * layer.logit_cap
        i = torch.arange(prefix, prefix + n, device=q.device)[:, None]  # query positions
        j = torch.arange(prefix + n, device=q.device)[None, :]  # key positions
        visible = j <= i
        if layer.sliding_window is not None:
            visible &= j > i - layer.sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        if layer.sinks is not None:
            sink = layer.sinks.detach().double().view(h, 1, 1).expand(h, n, 1)
            scores = torch.cat([scores, sink], dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)
        probs = scores.softmax(dim=-1)[..., : prefix + n]  # the sink column dropped
        outs.append((probs @ v).transpose(0, 1).reshape(n, h * d))
        row += n
    return torch.cat(outs).float()


def run_triton(case: Case, num_kv_splits: int | None = None) -> torch.Tensor:
    from sgl_ray.attention.triton_backend import TritonAttentionBackend

    backend = nan_buffers(TritonAttentionBackend(case.qkv.device, num_kv_splits=num_kv_splits))
    batch = make_batch(case, case.pool, backend)
    return backend.forward(*split_qkv(case), case.layer, batch)


def check(case: Case, num_kv_splits: int | None = None, run=None) -> None:
    """``run(case)``: the backend under test (default: Triton with ``num_kv_splits``). The reference is the torch
    backend, or for a layer with a window, sinks or a score cap the dense softmax."""
    layer = case.layer
    special = layer.sliding_window is not None or layer.sinks is not None or layer.logit_cap is not None
    expected = dense_reference(case) if special else reference(case)  # before the run mutates case.pool
    k_before = [b.clone() for b in case.pool.k_buffers]
    v_before = [b.clone() for b in case.pool.v_buffers]
    out = run_triton(case, num_kv_splits) if run is None else run(case)
    assert out.shape == (int(case.extend_lens.sum()), layer.num_heads * layer.head_dim)
    assert out.dtype == case.qkv.dtype
    assert torch.isfinite(out).all(), "unwritten output rows or a read of a poisoned slot"
    tol = TOLERANCE[case.qkv.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    # The store: new K/V at out_cache_loc of this layer, nothing else touched anywhere.
    _, k_new, v_new = split_qkv(case)
    shape = (-1, layer.num_kv_heads, layer.head_dim)
    k_before[LAYER_ID][case.out_cache_loc] = k_new.reshape(shape)
    v_before[LAYER_ID][case.out_cache_loc] = v_new.reshape(shape)
    for got, want in zip(case.pool.k_buffers + case.pool.v_buffers, k_before + v_before, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)


def ragged_lens(n: int, low: int, high: int, seed: int) -> np.ndarray:
    lens = np.random.default_rng(seed).integers(low, high + 1, size=n)
    lens[:2] = low, high
    return lens


# --- decode ----------------------------------------------------------------------------------------------------

DECODE_LENS = {
    "b1-long": np.array([4096]),
    "b1-first": np.array([1]),
    "b2-short": np.array([300, 512]),  # the 32-key splits that prefetch (SHORT_DECODE)
    "b64-ragged": ragged_lens(64, 1, 4096, seed=1),
}


@pytest.mark.parametrize("lens", list(DECODE_LENS), ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_decode_bf16(lens, head_dim, heads):
    seq = DECODE_LENS[lens]
    check(make_case(seq - 1, np.ones_like(seq), *heads, head_dim, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_other_dtypes(dtype, head_dim):
    seq = DECODE_LENS["b64-ragged"]
    check(make_case(seq - 1, np.ones_like(seq), 16, 4, head_dim, dtype, seed=2))


@pytest.mark.parametrize("num_kv_splits", [1, 2, 8, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_forced_splits(num_kv_splits, dtype):
    """Fixed split counts, with requests shorter than one block per split (empty splits)."""
    seq = np.array([1, 2, 63, 64, 65, 100, 1000, 4096, 3000, 129])
    check(make_case(seq - 1, np.ones_like(seq), 32, 8, 128, dtype, seed=3), num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("num_kv_splits", [None, 1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 64], ids=lambda b: f"shape-for-{b}")
def test_decode_prefetch_gives_the_same_bits(num_kv_splits, dtype, batch, monkeypatch):
    """Stage 1 loading its first block of cached K/V before it waits for the kernel that stores this step's
    token reads the same values as loading everything after the wait: the outputs are bit-identical (with the
    launch shape the engine picks for a decode batch of ``batch``)."""
    from sgl_ray.attention import triton_kernels

    seq = np.array([1, 2, 31, 32, 33, 127, 128, 129, 300, 1000, 4096, 257])  # the new token at block edges
    shape = triton_kernels.decode_config(128, dtype, batch)
    outs = []
    for prefetch in (False, True):
        config = shape._replace(prefetch=prefetch)
        monkeypatch.setattr(triton_kernels, "decode_config", lambda *_, config=config: config)
        case = make_case(seq - 1, np.ones_like(seq), 32, 8, 128, dtype, seed=12)
        outs.append(run_triton(case, num_kv_splits))
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


@pytest.mark.parametrize("lens", [[1000], [31, 512]], ids=str)
def test_decode_short_graph_metadata(lens):
    """The metadata of a decode graph captured for short sequences (prefetching 32-key splits, one block each)
    gives the reference's output, as the full-length graph's does."""
    from sgl_ray.attention import triton_kernels
    from sgl_ray.attention.triton_backend import TritonAttentionBackend

    seq = np.array(lens)
    assert triton_kernels.decode_config(128, torch.bfloat16, len(seq), int(seq.max())).prefetch
    for max_len in (triton_kernels.SHORT_DECODE_TOKENS // len(seq), 8192):

        def run(case, max_len=max_len):
            backend = nan_buffers(TritonAttentionBackend(case.qkv.device))
            batch = make_batch(case, case.pool, backend)
            batch.extend_start_loc = torch.arange(len(seq), device=case.qkv.device)
            batch.attn_metadata = backend.graph_metadata(batch, max_len)
            return backend.forward(*split_qkv(case), case.layer, batch)

        check(make_case(seq - 1, np.ones_like(seq), 32, 8, 128, torch.bfloat16, seed=13), run=run)


# --- extend ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True], ids=["no-prefix", "prefix"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_extend_bf16(cached, head_dim, heads):
    ext = np.array([1000, 2, 65, 64, 377, 129, 1])  # block edges, a 1-token prompt (a decode row) too
    prefix = np.array([1500, 0, 7, 64, 640, 1, 0]) if cached else np.zeros_like(ext)
    check(make_case(prefix, ext, *heads, head_dim, torch.bfloat16, seed=4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_extend_other_dtypes(dtype, head_dim):
    ext = ragged_lens(6, 2, 1000, seed=5)
    prefix = ragged_lens(6, 0, 1000, seed=6)
    check(make_case(prefix, ext, 16, 4, head_dim, dtype, seed=7))


# --- mixed -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_mixed(heads, dtype):
    rng = np.random.default_rng(8)
    ext = np.where(
        rng.random(24) < 0.6, 1, rng.integers(2, 400, size=24)
    )  # decode and extend rows interleaved
    prefix = rng.integers(0, 2000, size=24)
    check(make_case(prefix, ext, *heads, 128, dtype, seed=9))


@pytest.mark.parametrize("head_dim", [32, 96, 256])
def test_other_head_dims(head_dim):
    ext = np.array([1, 300, 1, 1, 70])
    prefix = np.array([2000, 100, 0, 500, 0])
    check(make_case(prefix, ext, 16, 2, head_dim, torch.bfloat16, seed=10))


def test_store_only_at_out_cache_loc():
    """Stores land in their slots, also for a request whose prefix is empty and one with one new token."""
    case = make_case(np.array([0, 5, 300]), np.array([3, 1, 40]), 8, 2, 64, torch.float32, seed=11)
    check(case)
    _, k_new, _ = split_qkv(case)
    k_new = k_new.reshape(-1, 2, 64)
    row = 0
    for s, p, n in zip(case.slots, case.prefix_lens, case.extend_lens, strict=True):
        torch.testing.assert_close(case.pool.k_buffers[LAYER_ID][s[p:]], k_new[row : row + n], atol=0, rtol=0)
        row += n


def test_registry_default_is_triton():
    from sgl_ray.attention.triton_backend import TritonAttentionBackend

    device = torch.device("cuda")
    assert default_backend_name(device) == "triton"
    assert isinstance(create_attention_backend(None, device), TritonAttentionBackend)
