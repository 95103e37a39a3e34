"""The MLA backends (``sgl_ray.attention.mla``) against attention written out here in fp64 with the latents
up-projected to per-head K/V (what transformers computes), and the engine with a DeepSeek-V3-shaped model on CUDA.

Every case lays its requests' tokens on shuffled, non-contiguous pool slots, poisons every slot nothing has written
(and the backend's output and scratch buffers) with NaN, and checks that the step's latents land at
``out_cache_loc`` of its layer and nowhere else. The helpers (``make_case``, ``check``) also serve the CPU tiers:
``tests/unit/test_mla_attention.py`` runs them on the torch backend and, under Triton's interpreter, on the Triton
one. Run on the device machine (``pytest -m gpu``); skipped where there is no GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sgl_ray.attention.mla import LatentAttention
from sgl_ray.mem_cache.kv_pool import MLAKVPool
from sgl_ray.runner.forward_batch import ForwardBatch

LAYER_ID = 1  # of 2: the other layer's latents must stay untouched
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # atol = rtol


@dataclass(frozen=True)
class Dims:
    heads: int = 4
    nope: int = 16
    rope: int = 16
    v: int = 24
    lora: int = 32


DEEPSEEK = Dims(heads=16, nope=128, rope=64, v=128, lora=512)  # DeepSeek-V2/V3 at 8-way tensor parallelism


@dataclass
class Case:
    prefix_lens: np.ndarray  # [B]
    extend_lens: np.ndarray  # [B]
    slots: list[torch.Tensor]  # per request, [seq_len] pool slots
    req_pool_idxs: torch.Tensor  # [B]
    req_to_token: torch.Tensor  # [max_reqs, max_context]
    out_cache_loc: torch.Tensor  # [T]
    pool: MLAKVPool  # prefix latents written, everything else NaN (slot 0 zero)
    q_nope: torch.Tensor  # [T, H, nope]
    q_pe: torch.Tensor  # [T, H, R]
    latent: torch.Tensor  # [T, C + R] this step's latents
    layer: LatentAttention


def make_case(prefix_lens, extend_lens, dims: Dims, dtype, device="cuda", seed=0) -> Case:
    gen = torch.Generator(device).manual_seed(seed)
    prefix = np.asarray(prefix_lens, dtype=np.int64)
    ext = np.asarray(extend_lens, dtype=np.int64)
    seq = prefix + ext
    total, num_tokens = int(seq.sum()), int(ext.sum())
    num_slots = 1 + total + total // 4 + 8  # spare slots stay poisoned
    perm = 1 + torch.randperm(num_slots - 1, generator=gen, device=device)
    bounds = np.concatenate(([0], np.cumsum(seq)))
    slots = [perm[bounds[r] : bounds[r + 1]] for r in range(len(seq))]
    max_reqs = len(seq) + 5
    req_pool_idxs = torch.randperm(max_reqs, generator=gen, device=device)[: len(seq)]
    req_to_token = torch.zeros((max_reqs, int(seq.max()) + 16), dtype=torch.int64, device=device)
    for r, s in enumerate(slots):
        req_to_token[req_pool_idxs[r], : len(s)] = s  # the runner writes new tokens' slots before the forward
    width = dims.lora + dims.rope
    pool = MLAKVPool(num_slots, 2, width, dtype, device)
    for buf in pool.latent_buffers:
        buf.fill_(math.nan)
        buf[0].zero_()

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    cached = torch.cat([s[:p] for s, p in zip(slots, prefix, strict=True)])
    pool.latent_buffers[LAYER_ID][cached] = randn(len(cached), width)
    layer = LatentAttention(
        dims.heads, dims.nope, dims.rope, dims.v, dims.lora, (dims.nope + dims.rope) ** -0.5, LAYER_ID
    ).to(device)
    weight = torch.randn(layer.kv_b_proj.weight.shape, generator=gen, device=device) * dims.lora**-0.5
    layer.kv_b_proj.weight.data = weight.to(dtype)
    out_cache_loc = torch.cat([s[p:] for s, p in zip(slots, prefix, strict=True)])
    q = randn(num_tokens, dims.heads, dims.nope + dims.rope)
    q_nope, q_pe = q.split([dims.nope, dims.rope], dim=-1)  # strided views, as the model passes them
    return Case(
        prefix, ext, slots, req_pool_idxs, req_to_token, out_cache_loc, pool, q_nope, q_pe,
        randn(num_tokens, width), layer,
    )  # fmt: skip


def make_batch(case: Case, backend) -> ForwardBatch:
    ext, prefix = case.extend_lens, case.prefix_lens
    dev = case.q_nope.device
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
        kv_pool=case.pool,
        req_to_token=case.req_to_token,
        attn_backend=backend,
    )
    backend.init_forward_metadata(batch)
    return batch


def reference(case: Case) -> torch.Tensor:
    """Per request in fp64: every latent of the sequence up-projected to per-head keys ``[k_nope | k_pe]`` and
    values, causal softmax. [T, H, v] in fp32."""
    layer = case.layer
    h, nope, c_dim = layer.num_heads, layer.qk_nope_head_dim, layer.kv_lora_rank
    w = layer.kv_b_proj.weight.detach().double().view(h, nope + layer.v_head_dim, c_dim)
    pool = case.pool.latent_buffers[LAYER_ID].double()
    q_all = torch.cat([case.q_nope, case.q_pe], dim=-1).double()
    new_all = case.latent.double()
    outs, row = [], 0
    for slots, prefix, n in zip(case.slots, case.prefix_lens, case.extend_lens, strict=True):
        prefix, n = int(prefix), int(n)
        lat = torch.cat([pool[slots[:prefix]], new_all[row : row + n]])  # [S, C + R]
        kv = torch.einsum("sc,hdc->hsd", lat[:, :c_dim], w)  # [H, S, nope + v]
        k = torch.cat([kv[..., :nope], lat[None, :, c_dim:].expand(h, -1, -1)], dim=-1)
        v = kv[..., nope:]
        q = q_all[row : row + n].transpose(0, 1)  # [H, n, nope + R]
        scores = q @ k.transpose(1, 2) * layer.scaling  # [H, n, S]
        i = torch.arange(prefix, prefix + n, device=q.device)[:, None]
        j = torch.arange(prefix + n, device=q.device)[None, :]
        scores = scores.masked_fill(j > i, float("-inf"))
        outs.append((scores.softmax(dim=-1) @ v).transpose(0, 1))  # [n, H, v]
        row += n
    return torch.cat(outs).float()


def create_backend(name: str, device, num_kv_splits: int | None = None):
    from sgl_ray.attention import create_attention_backend

    backend = create_attention_backend(name, torch.device(device), num_kv_splits, mla=True)
    # every output/scratch buffer the backend allocates starts as NaN
    backend._new_buffer = lambda shape, dtype: torch.full(shape, math.nan, dtype=dtype, device=backend.device)
    return backend


def check(case: Case, backend_name: str, num_kv_splits: int | None = None) -> None:
    expected = reference(case)  # before the run stores this step's latents
    before = [b.clone() for b in case.pool.latent_buffers]
    backend = create_backend(backend_name, case.q_nope.device, num_kv_splits)
    out = backend.forward_mla(case.q_nope, case.q_pe, case.latent, case.layer, make_batch(case, backend))
    layer = case.layer
    assert out.shape == (case.q_nope.shape[0], layer.num_heads, layer.v_head_dim)
    assert out.dtype == case.q_nope.dtype
    assert torch.isfinite(out).all(), "unwritten output rows or a read of a poisoned slot"
    tol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    before[LAYER_ID][case.out_cache_loc] = case.latent
    for got, want in zip(case.pool.latent_buffers, before, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)


def ragged_lens(n: int, low: int, high: int, seed: int) -> np.ndarray:
    lens = np.random.default_rng(seed).integers(low, high + 1, size=n)
    lens[:2] = low, high
    return lens


# --- on CUDA --------------------------------------------------------------------------------------------------

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


DECODE_LENS = {
    "b1-long": np.array([4096]),
    "b1-first": np.array([1]),
    "b64-ragged": ragged_lens(64, 1, 4096, seed=1),
}
V3_HEADS = Dims(heads=128, nope=128, rope=64, v=128, lora=512)  # DeepSeek-V3 on one GPU


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("lens", list(DECODE_LENS))
@pytest.mark.parametrize("dims", [DEEPSEEK, V3_HEADS], ids=["h16", "h128"])
def test_decode(backend, dtype, lens, dims):
    seq = DECODE_LENS[lens]
    check(make_case(seq - 1, np.ones_like(seq), dims, dtype), backend)


@pytest.mark.parametrize("num_kv_splits", [1, 2, 8, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_forced_splits(num_kv_splits, dtype):
    """Fixed split counts, with requests shorter than one block per split (empty splits)."""
    seq = np.array([1, 2, 31, 32, 33, 100, 1000, 4096, 3000, 129])
    check(make_case(seq - 1, np.ones_like(seq), DEEPSEEK, dtype, seed=3), "triton", num_kv_splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_mixed_decode_and_extend(dtype):
    """Decode rows between extends with and without a cached prefix (a prefix-cache hit's extend)."""
    prefix = np.array([30, 0, 700, 10, 3, 0, 2000])
    ext = np.array([1, 300, 1, 70, 1, 1, 129])
    check(make_case(prefix, ext, DEEPSEEK, dtype, seed=4), "triton")
