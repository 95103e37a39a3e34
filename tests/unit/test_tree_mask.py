"""Speculative tree verification's attention mask: each draft node sees the request's cached prefix, its
ancestors and itself. Checked against a brute-force softmax per node on the torch backend, and on the Triton
extend kernel in Triton's CPU interpreter (the session's shared interpreter process)."""

from __future__ import annotations

import pytest
import torch

# A brute-force check of the tree mask, run here on the torch backend and in the interpreter on the Triton one:
# two tree requests (with and without a cached prefix) between a causal extend and a decode row.
_CHECK = """
import numpy as np, torch
from types import SimpleNamespace
from sgl_ray.attention.base import TreeMask, new_token_positions
from sgl_ray.mem_cache.kv_pool import KVPool
from sgl_ray.runner.forward_batch import ForwardBatch

# (prefix, parents of each row (row 0: the root) or the extend length of a causal request)
REQUESTS = [(7, [0, 0, 1, 2]), (0, [0, 0, 0, 1, 1, 3]), (12, 1), (5, [0, 0, 1, 1, 3, 2, 5])]


def wide_tree(n, seed):
    # n rows, parents first, most of them shallow: past the first block of queries (64) rows are still near the root
    rng = np.random.default_rng(seed)
    return [0] + [int(rng.integers(max(0, i - 6), i)) if i > 8 else int(rng.integers(0, i)) for i in range(1, n)]


def depths_of(par):
    d = [0] * len(par)
    for i in range(1, len(par)):
        d[i] = d[par[i]] + 1
    return d


def check_tree_attention(backend, dtype=torch.float32, atol=1e-4, window=None, requests=REQUESTS):
    g = torch.Generator().manual_seed(0)
    h, kvh, d = 2, 1, 16
    prefix = np.array([p for p, _ in requests])
    ext = np.array([len(t) if isinstance(t, list) else t for _, t in requests])
    parents = {r: t for r, (_, t) in enumerate(requests) if isinstance(t, list)}
    nreq, total = len(requests), int(ext.sum())
    width = int((prefix + ext).max())
    pool = KVPool(int((prefix + ext).sum()) + 8, 1, kvh, d, dtype, torch.device("cpu"))
    table = torch.zeros(nreq, width, dtype=torch.int64)
    slots = torch.randperm(pool.num_slots - 1, generator=g)[: int((prefix + ext).sum())] + 1
    used = 0
    for r in range(nreq):
        n = int(prefix[r] + ext[r])
        table[r, :n] = slots[used : used + n]
        used += n
    for r in range(nreq):  # the cached prefixes
        p = int(prefix[r])
        k0 = torch.randn(p, kvh, d, generator=g).to(dtype)
        pool.set_kv(0, table[r, :p], k0, torch.randn(p, kvh, d, generator=g).to(dtype))
    starts = np.cumsum(ext) - ext
    out_loc = torch.cat([table[r, int(prefix[r]) : int(prefix[r] + ext[r])] for r in range(nreq)])
    blocks, offsets = [], np.full(nreq, -1)
    off = 0
    for r, par in parents.items():
        n = int(ext[r])
        m = torch.eye(n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j:
                j = par[j]
                m[i, j] = True
        blocks.append(m.reshape(-1))
        offsets[r] = off
        off += n * n
    tree = TreeMask(torch.cat(blocks), offsets)
    q = torch.randn(total, h * d, generator=g).to(dtype)
    k = torch.randn(total, kvh * d, generator=g).to(dtype)
    v = torch.randn(total, kvh * d, generator=g).to(dtype)
    batch = ForwardBatch(
        input_ids=torch.zeros(total, dtype=torch.int64), positions=torch.zeros(total, dtype=torch.int64),
        out_cache_loc=out_loc, req_pool_idxs=torch.arange(nreq), seq_lens=torch.from_numpy(prefix + ext),
        extend_start_loc=torch.from_numpy(starts), logits_indices=torch.zeros(0, dtype=torch.int64),
        prefix_lens_cpu=prefix, extend_lens_cpu=ext, kv_pool=pool, req_to_token=table, attn_backend=backend,
        tree_mask=tree,
    )
    backend.init_forward_metadata(batch)
    layer = SimpleNamespace(num_heads=h, num_kv_heads=kvh, head_dim=d, layer_id=0, scaling=d**-0.5,
                            sliding_window=window, sinks=None, logit_cap=None)
    out = backend.forward(q, k, v, layer, batch).float().view(total, h, d)
    kb, vb = pool.get_kv(0)
    cut = 0  # rows whose window leaves out part of the prefix
    want_pos = []
    for r in range(nreq):
        p, n = int(prefix[r]), int(ext[r])
        pos = depths_of(parents[r]) if r in parents else list(range(n))  # among the new tokens
        want_pos += pos
        for i in range(n):  # brute force: the prefix, the node's ancestors (or the causal rows) and itself
            if r in parents:
                seen, j = [i], i
                while j:
                    j = parents[r][j]
                    seen.append(j)
            else:
                seen = list(range(i + 1))
            keys = [j for j in range(p)] + [p + j for j in sorted(seen)]
            key_pos = list(range(p)) + [p + pos[j] for j in sorted(seen)]
            if window is not None:  # query position q sees key position x iff q - window < x <= q
                keys = [s for s, x in zip(keys, key_pos) if x > p + pos[i] - window]
                cut += p > 0 and p + pos[i] - window + 1 > 0
            kk = kb[table[r, keys]].float().repeat_interleave(h // kvh, dim=1)  # [L, H, D]
            vv = vb[table[r, keys]].float().repeat_interleave(h // kvh, dim=1)
            qi = q[starts[r] + i].float().view(h, d)
            w = torch.einsum("hd,lhd->hl", qi, kk).mul(d**-0.5).softmax(dim=-1)
            want = torch.einsum("hl,lhd->hd", w, vv)
            torch.testing.assert_close(out[starts[r] + i], want, atol=atol, rtol=1e-3)
    assert new_token_positions(batch).tolist() == want_pos
    return cut
"""


def test_tree_mask_torch_backend():
    from sgl_ray.attention.torch_backend import TorchAttentionBackend

    scope: dict = {}
    exec(compile(_CHECK, "<tree check>", "exec"), scope)
    scope["check_tree_attention"](TorchAttentionBackend(torch.device("cpu")))


def test_tree_mask_triton_kernel_in_the_interpreter(triton_interpreter):
    script = (
        _CHECK
        + "\nfrom sgl_ray.attention.triton_backend import TritonAttentionBackend\n"
        + "check_tree_attention(TritonAttentionBackend('cpu'))\n"
    )
    error = triton_interpreter.run(script)
    assert not error, error[-3000:]


# With a sliding window: a causal extend beside the trees (its rows' positions are their indices) and a 70-row
# tree whose second block of queries (rows 64 ..) still holds rows near the root, so the window reaches back from
# each row's depth, not its index. Windows of 1 (only itself), 3 and 6 cut the prefix for most rows; 100 for none.
_WINDOWED = "WINDOWED = REQUESTS + [(9, 5), (20, wide_tree(70, seed=1))]\n"


@pytest.mark.parametrize("window", [1, 3, 6, 100])
def test_tree_mask_with_window_torch_backend(window):
    from sgl_ray.attention.torch_backend import TorchAttentionBackend

    scope: dict = {}
    exec(compile(_CHECK + _WINDOWED, "<tree check>", "exec"), scope)
    backend = TorchAttentionBackend(torch.device("cpu"))
    cut = scope["check_tree_attention"](backend, window=window, requests=scope["WINDOWED"])
    assert (cut > 0) == (window < 100)


def test_tree_mask_with_window_triton_kernel_in_the_interpreter(triton_interpreter):
    script = (
        _CHECK
        + _WINDOWED
        + "from sgl_ray.attention.triton_backend import TritonAttentionBackend\n"
        + "for window in (1, 3, 6):\n"
        + "    assert check_tree_attention(TritonAttentionBackend('cpu'), window=window, requests=WINDOWED) > 0\n"
    )
    error = triton_interpreter.run(script)
    assert not error, error[-3000:]
