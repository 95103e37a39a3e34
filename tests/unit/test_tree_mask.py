"""Speculative tree verification's attention mask: each draft node sees the request's cached prefix, its
ancestors and itself. Checked against a brute-force softmax per node on the torch backend, and on the Triton
extend kernel in Triton's CPU interpreter (the session's shared interpreter process)."""

from __future__ import annotations

import torch

# A brute-force check of the tree mask, run here on the torch backend and in the interpreter on the Triton one:
# two tree requests (with and without a cached prefix) between a causal extend and a decode row.
_CHECK = """
import numpy as np, torch
from types import SimpleNamespace
from sgl_ray.attention.base import TreeMask
from sgl_ray.mem_cache.kv_pool import KVPool
from sgl_ray.runner.forward_batch import ForwardBatch


def check_tree_attention(backend, dtype=torch.float32, atol=1e-4):
    g = torch.Generator().manual_seed(0)
    h, kvh, d = 2, 1, 16
    prefix = np.array([7, 0, 12, 5])
    ext = np.array([4, 6, 1, 7])
    parents = {0: [0, 0, 1, 2], 1: [0, 0, 0, 1, 1, 3], 3: [0, 0, 1, 1, 3, 2, 5]}  # row i's parent (row 0: root)
    total = int(ext.sum())
    pool = KVPool(128, 1, kvh, d, dtype, torch.device("cpu"))
    table = torch.zeros(4, 64, dtype=torch.int64)
    slots = torch.randperm(120, generator=g)[: int((prefix + ext).sum())] + 1
    used = 0
    for r in range(4):
        n = int(prefix[r] + ext[r])
        table[r, :n] = slots[used : used + n]
        used += n
    for r in range(4):  # the cached prefixes
        p = int(prefix[r])
        k0 = torch.randn(p, kvh, d, generator=g).to(dtype)
        pool.set_kv(0, table[r, :p], k0, torch.randn(p, kvh, d, generator=g).to(dtype))
    starts = np.cumsum(ext) - ext
    out_loc = torch.cat([table[r, int(prefix[r]) : int(prefix[r] + ext[r])] for r in range(4)])
    blocks, offsets, depth_pos = [], np.full(4, -1), []
    off = 0
    for r in range(4):
        n = int(ext[r])
        if r not in parents:
            continue
        par = parents[r]
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
        out_cache_loc=out_loc, req_pool_idxs=torch.arange(4), seq_lens=torch.from_numpy(prefix + ext),
        extend_start_loc=torch.from_numpy(starts), logits_indices=torch.zeros(0, dtype=torch.int64),
        prefix_lens_cpu=prefix, extend_lens_cpu=ext, kv_pool=pool, req_to_token=table, attn_backend=backend,
        tree_mask=tree,
    )
    backend.init_forward_metadata(batch)
    layer = SimpleNamespace(num_heads=h, num_kv_heads=kvh, head_dim=d, layer_id=0, scaling=d**-0.5,
                            sliding_window=None, sinks=None, logit_cap=None)
    out = backend.forward(q, k, v, layer, batch).float().view(total, h, d)
    kb, vb = pool.get_kv(0)
    for r in range(4):
        p, n = int(prefix[r]), int(ext[r])
        for i in range(n):  # brute force: the prefix, the node's ancestors (or the causal rows) and itself
            if r in parents:
                seen, j = [i], i
                while j:
                    j = parents[r][j]
                    seen.append(j)
            else:
                seen = list(range(i + 1))
            keys = torch.cat([table[r, :p], table[r, p + torch.tensor(sorted(seen))]])
            kk = kb[keys].float().repeat_interleave(h // kvh, dim=1)  # [L, H, D]
            vv = vb[keys].float().repeat_interleave(h // kvh, dim=1)
            qi = q[starts[r] + i].float().view(h, d)
            w = torch.einsum("hd,lhd->hl", qi, kk).mul(d**-0.5).softmax(dim=-1)
            want = torch.einsum("hl,lhd->hd", w, vv)
            torch.testing.assert_close(out[starts[r] + i], want, atol=atol, rtol=1e-3)
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
