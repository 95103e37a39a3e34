"""Triton extend (prefill) attention over a ragged batch: new tokens attend to their cached prefix, then causally.

The backend cuts every extend request's new tokens into blocks of ``EXTEND_BLOCK_M`` queries and ships one row per
block (a host-built table), so the grid is exactly (H, NB) with no padding programs::

    request r:  | cached prefix (prefix_len) ---------------- | new tokens (extend_len) ---------- |
                  read through req_to_token[req_pool_idx[r]]    read from k / v rows token0 .. token0+n
    block b of r: queries q_start .. q_start + BLOCK_M; sees the whole prefix, and new key j iff j <= query i

Grid dimension 0 is the query head, so the programs of one block run side by side and share its K/V in L2.

With a sliding window (``HAS_WINDOW``), query ``i`` (position ``prefix + i``) sees key ``j`` iff
``i - window < j <= i`` as well; a block starts both loops at the first key its first query sees, and a row may
see nothing of a block before its own window starts (``online_softmax_step``'s ``MAYBE_EMPTY``). Sinks
(``HAS_SINKS``) join each row's denominator at the end; soft-capped scores (``HAS_CAP``) are capped before the
mask. Layers with none of them compile to the plain kernel.

A windowed layer of hybrid KV pools (``HAS_SLOT_MAP``) reads every slot of ``req_to_token`` through the map to its
own pool, as the decode kernel does (``triton_kernels.load_slots``).

With an FP8 pool (``NEW_FROM_POOL``) the new tokens' keys and values are read back from the pool, where the
backend has just stored them, rather than from ``k``/``v``: every key is then what the pool holds (the layer's K
scale folded into ``qk_scale``, its V scale applied to the output), as the decode kernel and the torch backend
read it, whether a prefix was computed in this step or an earlier one.

With draft trees (``HAS_TREE``, speculative verification) a block whose request has a tree mask
(``attention.base.TreeMask``; ``blk_tree``: its offset, -1 for causal requests) takes the visibility of new keys
from the mask instead of ``j <= i``; the causal loop bound still holds, since an ancestor comes before its node.
A tree row sits at position ``prefix + depth``, not ``prefix + i``; with a window as well (``HAS_POS``) each row
reads its position among the request's new tokens from ``new_pos`` (its depth; its index in a causal request) and
the window compares positions: prefix key ``j`` is seen iff ``j > prefix + pos(i) - window``, new key ``a`` iff
``pos(a) > pos(i) - window``. Both loops start at the first key the block's smallest position reaches (a new key's
index is at least its position, so no seen key comes before).

With images whose tokens see each other both ways (``HAS_IMAGES``, Gemma 3; ``attention.base.image_key_ends``)
each query row ``i`` reads ``image_end[row]``, the end of its image counted among the request's new tokens (0 for
a token outside any image), and sees new key ``j`` iff ``j < max(i + 1, image_end)``; a block's loop over new keys
runs to the largest of those ends. One int32 per token row: an image is a contiguous span, so "the keys a query
sees" is still a prefix of the sequence, cut behind by the window as before (``i - window < j``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_ray.attention.triton_kernels import LOG2E, load_slots, online_softmax_step, sink_term

EXTEND_BLOCK_M = 64  # queries per program; the unit of the backend's block table


# fmt: off
@triton.jit
def _extend_kernel(
    Q, Knew, Vnew, K, V, Out, Sinks, TreeMask, blk_tree, ImageEnd, NewPos, SlotMap,
    req_to_token, req_pool_idxs, blk_row, blk_token, blk_qstart, blk_prefix, blk_len,
    qk_scale, v_scale, group, window, logit_cap,
    stride_qt, stride_qh, stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_r2t,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_CAP: tl.constexpr,
    NEW_FROM_POOL: tl.constexpr, HAS_TREE: tl.constexpr, HAS_IMAGES: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_SLOT_MAP: tl.constexpr,
):
    # fmt: on
    head = tl.program_id(0)
    b = tl.program_id(1)
    kv_head = head // group
    token0 = tl.load(blk_token + b).to(tl.int64)  # row of the request's first new token
    q_start = tl.load(blk_qstart + b)  # this block's first query, counted among the request's new tokens
    prefix = tl.load(blk_prefix + b)
    n_new = tl.load(blk_len + b)
    req = tl.load(req_pool_idxs + tl.load(blk_row + b)).to(tl.int64)

    offs_m = q_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_new
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + (token0 + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Each row's position among the request's new tokens: its index, or (HAS_POS: draft trees under a window)
    # its depth. The loops start where the block's smallest position reaches (a new key's index is at least its
    # position).
    q_pos = offs_m
    pos_min = q_start
    if HAS_POS:
        q_pos = tl.load(NewPos + token0 + offs_m, mask=mask_m, other=0)
        pos_min = tl.min(tl.where(mask_m, q_pos, n_new), 0)

    # Cached prefix, fully visible without a window (each block holds a valid key, so m_i turns finite at once).
    slot_row = req_to_token + req * stride_r2t
    p_start = 0
    n_start = 0
    if HAS_WINDOW:  # the first key the block's nearest query sees, among the prefix / among the new tokens
        p_start = tl.maximum(prefix + pos_min - window + 1, 0)
        n_start = tl.maximum(pos_min - window + 1, 0)
    for n0 in range(p_start, prefix, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < prefix
        slots = load_slots(slot_row, offs_n, mask_n, SlotMap, HAS_SLOT_MAP)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        visible = mask_n[None, :]
        if HAS_WINDOW:  # prefix key n is at distance prefix + q_pos - n from the query
            visible = visible & (offs_n[None, :] > (prefix + q_pos)[:, None] - window)
        m_i, l_i, acc = online_softmax_step(
            q, k, v, visible, qk_scale, m_i, l_i, acc, IEEE, HAS_WINDOW, logit_cap, HAS_CAP
        )

    # New tokens, causal, up to the block's last query (or the end of the last image its queries are in). Without a
    # window new key 0 is visible to every row (padding rows too); with one, every real row sees itself.
    n_end = tl.minimum(n_new, q_start + BLOCK_M)
    key_end = offs_m + 1  # [BLOCK_M] the end (exclusive, among the new tokens) of the new keys each row sees
    if HAS_IMAGES:
        key_end = tl.maximum(key_end, tl.load(ImageEnd + token0 + offs_m, mask=mask_m, other=0))
        n_end = tl.minimum(n_new, tl.max(key_end, 0))
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_new
        kv_mask = mask_n[:, None] & mask_d[None, :]
        if NEW_FROM_POOL:  # as stored (FP8), at the slots of positions prefix + n
            slots = load_slots(slot_row + prefix, offs_n, mask_n, SlotMap, HAS_SLOT_MAP)
            k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        else:
            rows = (token0 + offs_n)[:, None]
            k = tl.load(Knew + rows * stride_knt + kv_head * stride_knh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(Vnew + rows * stride_vnt + kv_head * stride_vnh + offs_d[None, :], mask=kv_mask, other=0.0)
        visible = mask_n[None, :] & (offs_n[None, :] < key_end[:, None])
        if HAS_TREE:  # a draft tree's request: its ancestors-or-self mask (padding rows stay causal)
            tree_off = tl.load(blk_tree + b).to(tl.int64)
            row_in = mask_m & ((offs_m * 0 + tree_off) >= 0)  # [BLOCK_M] (a vector: a scalar mask breaks loads)
            in_tree = row_in[:, None] & mask_n[None, :]
            own = tl.load(TreeMask + tree_off + offs_m[:, None] * n_new + offs_n[None, :], mask=in_tree, other=0)
            visible = tl.where(row_in[:, None], in_tree & (own != 0), visible)
        if HAS_WINDOW:
            k_pos = offs_n
            if HAS_POS:
                k_pos = tl.load(NewPos + token0 + offs_n, mask=mask_n, other=0)
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = online_softmax_step(
            q, k, v, visible, qk_scale, m_i, l_i, acc, IEEE, HAS_WINDOW, logit_cap, HAS_CAP
        )

    if HAS_SINKS:
        l_i += sink_term(tl.load(Sinks + head), m_i)
    o = acc / l_i[:, None] * v_scale
    tl.store(Out + (token0 + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :], o, mask=q_mask)


def extend_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D] the new tokens' keys
    v: torch.Tensor,
    k_buf: torch.Tensor,  # [num_slots, KVH, D]
    v_buf: torch.Tensor,
    out: torch.Tensor,  # [T, H, D]; the extend rows are written
    req_to_token: torch.Tensor,  # [max_reqs, max_context]
    req_pool_idxs: torch.Tensor,  # [B]
    blocks: torch.Tensor,  # [5, NB]: batch row, first-token row, q_start, prefix_len, extend_len per block
    scale: float,
    window: int | None = None,  # the layer's sliding window (None: full attention)
    sinks: torch.Tensor | None = None,  # [H] the layer's sink logits
    logit_cap: float | None = None,  # the layer's score soft cap (None: none)
    k_scale: float = 1.0,  # an FP8 pool's scales: a stored key means key * k_scale
    v_scale: float = 1.0,
    tree_mask: torch.Tensor | None = None,  # [sum n_r * n_r] uint8 draft-tree masks (attention.base.TreeMask)
    blk_tree: torch.Tensor | None = None,  # [NB] int32 each block's request's offset in tree_mask, -1: causal
    image_end: torch.Tensor | None = None,  # [T] int32 per token row: its image's end among its request's new
    # tokens, 0 outside images (attention.base.image_key_ends)
    new_pos: torch.Tensor | None = None,  # [T] int32 per token row: its position among its request's new tokens
    # (a draft tree's rows: their depth); read with a window only
    slot_map: torch.Tensor | None = None,  # [num_slots] int64 the table's slot -> the pool's (hybrid pools)
) -> None:
    num_blocks = blocks.shape[1]
    num_heads, head_dim = q.shape[1], q.shape[2]
    ieee = q.dtype == torch.float32
    wide = head_dim > 128 or ieee  # keep the K/V stages within shared memory
    blk_row, blk_token, blk_qstart, blk_prefix, blk_len = blocks.unbind(0)
    # fmt: off
    _extend_kernel[(num_heads, num_blocks)](
        q, k, v, k_buf, v_buf, out, q if sinks is None else sinks,
        q if tree_mask is None else tree_mask, blk_len if blk_tree is None else blk_tree,
        blk_len if image_end is None else image_end, blk_len if new_pos is None else new_pos,
        req_to_token if slot_map is None else slot_map, req_to_token, req_pool_idxs, blk_row, blk_token, blk_qstart, blk_prefix, blk_len,
        scale * k_scale * LOG2E, v_scale, num_heads // k_buf.shape[1], window or 0, (logit_cap or 0.0) * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1), out.stride(0), out.stride(1),
        req_to_token.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=EXTEND_BLOCK_M,
        BLOCK_N=32 if wide else 64, IEEE=ieee, HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None,
        HAS_CAP=logit_cap is not None, NEW_FROM_POOL=k_buf.dtype != q.dtype, HAS_TREE=tree_mask is not None,
        HAS_IMAGES=image_end is not None, HAS_POS=new_pos is not None and window is not None,
        HAS_SLOT_MAP=slot_map is not None, num_warps=4, num_stages=1 if head_dim > 128 and ieee else 2,
    )
    # fmt: on
