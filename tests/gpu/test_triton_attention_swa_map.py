"""The Triton backend on a windowed layer of hybrid KV pools (``mem_cache.hybrid_swa``): the request table holds
full-pool slots and the kernels read each through the ``full_to_swa`` map to the layer's own pool
(``triton_kernels.load_slots``), storing the new tokens at ``batch.swa_out_cache_loc``.

Each case of ``test_triton_attention`` (its pool standing for the windowed layers' pool) gets a full slot space of
its own (:func:`hybrid_table`): a shuffled full slot per position and a map that is no permutation of the identity.
Positions a query's window no longer reaches map to a poisoned (NaN) slot, as do the table's cells past each
sequence and every full slot nothing uses, so a kernel that read one would show it. Checked against the dense
softmax (``check``: the store too) and, bit for bit, against the same kernels on the table translated beforehand.
The helpers also serve the interpreter test on CPU (``tests/unit/test_triton_swa_map_interpreter.py``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
import torch

from .test_triton_attention import Case, check, make_batch, make_case, nan_buffers, ragged_lens, split_qkv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class HybridTable(NamedTuple):
    req_to_token: torch.Tensor  # [max_reqs, max_context] full slots
    out_cache_loc: torch.Tensor  # [T] full slots
    full_to_swa: torch.Tensor  # [num_full_slots] int64 -> the case's pool slots


def hybrid_table(case: Case, seed: int = 0) -> HybridTable:
    """Full slots for ``case`` (whose pool is the windowed layers'): request ``r``'s position ``p`` maps to
    ``case.slots[r][p]`` where its first new token's window reaches it (``p > prefix - window``), else to a poisoned
    slot, as a freed SWA page's slots would map to one that holds something else."""
    dev = case.qkv.device
    gen = torch.Generator(dev).manual_seed(seed)
    window = case.layer.sliding_window
    assert window is not None, "a windowed layer's case"
    used = torch.cat(case.slots)
    total = len(used)
    num_full = 1 + 2 * total + 8
    perm = 1 + torch.randperm(num_full - 1, generator=gen, device=dev)
    spare = perm[total:]  # full slots no position holds
    free = torch.ones(case.pool.num_slots, dtype=torch.bool, device=dev)
    free[0] = False
    free[used] = False
    poisoned = free.nonzero()[:, 0]  # never written: NaN
    full_to_swa = poisoned[torch.randint(len(poisoned), (num_full,), generator=gen, device=dev)]
    full_to_swa[0] = 0  # the reserved slot maps to the reserved slot
    table = spare[torch.randint(len(spare), case.req_to_token.shape, generator=gen, device=dev)]
    bounds = np.concatenate(([0], np.cumsum([len(s) for s in case.slots])))
    locs = []
    for r, (slots, prefix) in enumerate(zip(case.slots, case.prefix_lens, strict=True)):
        full = perm[bounds[r] : bounds[r + 1]]
        table[case.req_pool_idxs[r], : len(full)] = full
        live = slice(max(0, int(prefix) - window + 1), len(full))
        full_to_swa[full[live]] = slots[live]
        locs.append(full[int(prefix) :])
    return HybridTable(table, torch.cat(locs), full_to_swa)


def run_hybrid(
    table: HybridTable,
    num_kv_splits: int | None = None,
    graph_len: int | None = None,
    translated: bool = False,
):
    """``run(case)`` for ``check``: the Triton backend reading ``table`` through its map (``translated``: on the
    table translated beforehand, no map), on the metadata of a step or (``graph_len``) of a decode graph."""
    from sgl_ray.attention.triton_backend import TritonAttentionBackend

    def run(case: Case) -> torch.Tensor:
        backend = nan_buffers(TritonAttentionBackend(case.qkv.device, num_kv_splits=num_kv_splits))
        batch = make_batch(case, case.pool, backend)
        if translated:
            batch = dataclasses.replace(batch, req_to_token=table.full_to_swa[table.req_to_token])
        else:
            batch = dataclasses.replace(
                batch,
                req_to_token=table.req_to_token,
                out_cache_loc=table.out_cache_loc,
                full_to_swa=table.full_to_swa,
            )
            batch.translate_swa()
            assert torch.equal(batch.swa_out_cache_loc, case.out_cache_loc)
        if graph_len is not None:
            batch.extend_start_loc = torch.arange(batch.batch_size, device=case.qkv.device)
            batch.attn_metadata = backend.graph_metadata(batch, graph_len)
        return backend.forward(*split_qkv(case), case.layer, batch)

    return run


def check_hybrid(
    case: Case, num_kv_splits: int | None = None, graph_len: int | None = None, seed: int = 0
) -> None:
    """Through the map against the dense softmax and the store (``check``), then bit for bit against the same
    kernels on the translated table."""
    table = hybrid_table(case, seed)
    run = run_hybrid(table, num_kv_splits, graph_len)
    check(case, run=run)
    out = run(case)
    torch.testing.assert_close(
        out, run_hybrid(table, num_kv_splits, graph_len, translated=True)(case), atol=0, rtol=0
    )


def windowed_case(
    prefix, ext, heads, kv_heads, head_dim, dtype, window, device="cuda", seed=0, **layer
) -> Case:
    return make_case(
        np.asarray(prefix),
        np.asarray(ext),
        heads,
        kv_heads,
        head_dim,
        dtype,
        device=device,
        seed=seed,
        sliding_window=window,
        **layer,
    )


@pytest.mark.parametrize("num_kv_splits", [None, 1, 8])
@pytest.mark.parametrize("window", [1, 100, 1000], ids=lambda w: f"window-{w}")
def test_decode_through_the_map(window, num_kv_splits):
    """Ragged decode (the window past most sequences' start, or covering them) with forced splits, and with
    sinks as GPT-OSS."""
    seq = ragged_lens(24, 1, 3000, seed=20)
    check_hybrid(
        windowed_case(seq - 1, np.ones_like(seq), 64, 8, 64, torch.bfloat16, window, seed=21), num_kv_splits
    )
    case = windowed_case(seq - 1, np.ones_like(seq), 64, 8, 64, torch.bfloat16, window, seed=22, sinks=True)
    check_hybrid(case, num_kv_splits)


@pytest.mark.parametrize("lens", [[1000], [31, 512]], ids=str)
def test_decode_graph_metadata_through_the_map(lens):
    """The metadata of the decode graphs (the short-sequence one, whose 32-key splits read their first block
    before the wait, and the full-length one)."""
    seq = np.array(lens)
    for graph_len in (1024 // len(seq), 8192):
        case = windowed_case(seq - 1, np.ones_like(seq), 32, 8, 128, torch.bfloat16, 128, seed=23)
        check_hybrid(case, graph_len=graph_len)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("window", [1, 100, 1000], ids=lambda w: f"window-{w}")
def test_extend_through_the_map(dtype, window):
    """Extends over cached prefixes (the window starting inside the prefix and inside the new tokens) with decode
    rows between them."""
    ext = np.array([700, 2, 65, 1, 377, 129, 1])
    prefix = np.array([900, 0, 7, 40, 640, 1, 0])
    check_hybrid(windowed_case(prefix, ext, 16, 4, 64, dtype, window, seed=24))


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_pool_through_the_map(kv_dtype):
    """An FP8 pool, whose extend reads the new tokens back from the pool (at their mapped slots)."""
    from .test_kv_fp8_attention import check_fp8, fp8_case

    case = fp8_case(
        windowed_case([900, 0, 40, 7], [1, 300, 1, 65], 16, 4, 128, torch.bfloat16, 100, seed=25), kv_dtype
    )
    table = hybrid_table(case, seed=1)
    check_fp8(case, run_hybrid(table))
    torch.testing.assert_close(
        run_hybrid(table)(case), run_hybrid(table, translated=True)(case), atol=0, rtol=0
    )
