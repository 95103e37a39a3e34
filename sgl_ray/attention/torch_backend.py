"""Attention over the paged KV pool with ``torch.nn.functional.scaled_dot_product_attention`` (CPU default).

Requests adding one token (decode) run as one padded batch; requests adding several (prefill / extend) run one by
one with a causal mask offset by their cached prefix. A model that attends bidirectionally within each image
(Gemma 3) gets each image's tokens a mask reaching to the image's end (``base.image_key_ends``).

Layers with a sliding window, attention sinks or soft-capped scores (see ``sgl_ray.layers.attention``) run on a
variant of the step's metadata built on their first call and kept for the step (``_Metadata.variant``): decode rows
gather only the keys inside the window; extends are cut into query chunks, each with the keys its window reaches
and an explicit mask; a draft tree's rows (speculative verification, ``batch.tree_mask``) keep theirs, cut by the
window at their tree positions (prefix + depth, ``_windowed_tree``). With sinks or a cap the softmax is computed
explicitly (``attend_explicit``); without, SDPA takes the mask.

An FP8 pool (``kv_cache_dtype``) is read as stored: the gathered keys and values are widened to the query's dtype,
the layer's K scale multiplies the score scale and its V scale the output (``_attend``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sgl_ray.attention.base import AttentionBackend, image_key_ends
from sgl_ray.mem_cache.kv_pool import KVScale

if TYPE_CHECKING:
    from sgl_ray.layers.attention import RadixAttention
    from sgl_ray.runner.forward_batch import ForwardBatch

_UNSCALED = KVScale()  # a pool of the model's dtype
SCORE_BUDGET = 2**24  # scores (heads x queries x keys) one extend chunk of the window/sink path may hold


@dataclass
class _DecodePart:
    token_idx: torch.Tensor  # [Bd] rows of the token array
    kv_slots: torch.Tensor  # [Bd, L] KV slots, padded with slot 0
    mask: torch.Tensor | None  # [Bd, 1, 1, L] True where a key is real; None when no request is padded
    pool_rows: torch.Tensor  # [Bd] req_to_token rows
    seq_lens: np.ndarray  # [Bd] host copy


@dataclass
class _ExtendPart:
    token_start: int
    num_tokens: int
    kv_slots: torch.Tensor  # [L] the keys the part's queries may see (the request's first L, or a window's)
    mask: torch.Tensor | None  # [num_tokens, L], None when the plain causal mask applies
    tree: bool = False  # the mask is a draft tree's (batch.tree_mask), not causal
    # [num_tokens] the end (exclusive) of the keys each query sees, where an image's tokens see the whole image
    # (Gemma 3's prefill, see base.image_key_ends); None: causal (position + 1)
    key_end: np.ndarray | None = None


@dataclass
class _Metadata:
    decode: _DecodePart | None
    extends: list[_ExtendPart]
    req_to_token: torch.Tensor
    variants: dict[tuple[int | None, int], _Metadata] = field(default_factory=dict)
    swa: _Metadata | None = None  # hybrid KV pools: the same over the windowed layers' slots

    def variant(self, window: int | None, num_heads: int) -> _Metadata:
        """This step's metadata for layers with ``window`` (or sinks): every mask explicit, keys outside the
        window not gathered. Built once per step and (window, heads)."""
        key = (window, num_heads)
        if key not in self.variants:
            decode = self.decode
            if decode is not None and window is not None:
                decode = _windowed_decode(decode, self.req_to_token, window)
            extends = [
                chunk
                for part in self.extends
                for chunk in (
                    [_windowed_tree(part, window)]  # a draft tree: a few rows, its mask already explicit
                    if part.tree
                    else _extend_chunks(
                        part, int(part.kv_slots.shape[0]) - part.num_tokens, window, num_heads
                    )
                )
            ]
            self.variants[key] = _Metadata(decode, extends, self.req_to_token)
        return self.variants[key]


def _windowed_decode(dec: _DecodePart, req_to_token: torch.Tensor, window: int) -> _DecodePart:
    """Row i gathers its last ``min(seq_len, window)`` keys, padded with slot 0 (masked) to the longest."""
    lens = dec.seq_lens
    span = np.minimum(lens, window)  # [Bd] keys each row sees
    width = int(span.max())
    valid = np.arange(width)[None, :] < span[:, None]  # [Bd, L]
    positions = np.where(valid, (lens - span)[:, None] + np.arange(width)[None, :], 0)
    device = dec.kv_slots.device
    slots = req_to_token[dec.pool_rows[:, None], torch.from_numpy(positions).to(device)]  # [Bd, L]
    mask = None
    if not valid.all():
        valid_dev = torch.from_numpy(valid).to(device)
        slots = slots.masked_fill(~valid_dev, 0)  # read the reserved slot 0, never a stale one
        mask = valid_dev[:, None, None, :]
    return _DecodePart(dec.token_idx, slots, mask, dec.pool_rows, lens)


def _windowed_tree(part: _ExtendPart, window: int | None) -> _ExtendPart:
    """A draft tree's part (its mask: the whole prefix, then the tree's ancestors-or-self) for a layer with
    ``window``: row ``i`` sits at position ``P + depth(i)`` (``P``: the prefix length; a row's depth is its count
    of ancestors-or-self less one), so it sees prefix key ``j`` iff ``j > P + depth(i) - window`` and its ancestor
    ``a`` iff ``depth(a) > depth(i) - window``. Keys before ``P - window + 1`` are seen by no row (depths are
    at least 0) and are not gathered."""
    if window is None:
        return part
    assert part.mask is not None
    n = part.num_tokens
    prefix = int(part.kv_slots.shape[0]) - n
    depth = part.mask[:, prefix:].sum(dim=1) - 1  # [n]
    lo = max(0, prefix - window + 1)
    k_pos = torch.cat([torch.arange(lo, prefix, device=depth.device), prefix + depth])  # [L]
    q_pos = prefix + depth  # [n]
    mask = part.mask[:, lo:] & (k_pos[None, :] > q_pos[:, None] - window)  # [n, L]
    return _ExtendPart(part.token_start, n, part.kv_slots[lo:], mask, tree=True)


def _extend_chunks(part: _ExtendPart, prefix: int, window: int | None, num_heads: int) -> list[_ExtendPart]:
    """``part`` (queries at positions ``prefix .. prefix + n``; its ``kv_slots`` the request's first
    ``prefix + n`` keys) as query chunks, each over keys ``lo .. hi`` with an explicit mask: query ``i`` sees key
    ``j`` iff ``i - window < j <= i`` (``j < key_end[i]`` in place of ``j <= i`` with ``part.key_end``; ``lo``:
    the first key the chunk's first query sees; ``hi``: the end of the keys its queries see). Chunks hold at most
    ``SCORE_BUDGET`` scores (plus an image's keys past the last query)."""
    seq_len = prefix + part.num_tokens
    device = part.kv_slots.device
    per_head = SCORE_BUDGET // num_heads
    if window is None:
        rows = max(1, per_head // seq_len)
    else:  # `rows` queries see at most rows + window - 1 keys: the largest rows with rows * (rows + window) in budget
        rows = max(1, (math.isqrt(window * window + 4 * per_head) - window) // 2)
    chunks = []
    for first in range(0, part.num_tokens, rows):
        n = min(rows, part.num_tokens - first)
        q_pos = torch.arange(prefix + first, prefix + first + n, device=device)  # [n]
        lo = 0 if window is None else max(0, prefix + first - window + 1)
        ends = None if part.key_end is None else part.key_end[first : first + n]
        hi = prefix + first + n if ends is None else int(ends.max())
        k_pos = torch.arange(lo, hi, device=device)  # [L]
        if ends is None:
            mask = k_pos[None, :] <= q_pos[:, None]  # [n, L]
        else:
            mask = k_pos[None, :] < torch.from_numpy(ends).to(device)[:, None]
        if window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        chunks.append(_ExtendPart(part.token_start + first, n, part.kv_slots[lo:hi], mask))
    return chunks


def attend_explicit(
    q: torch.Tensor,  # [B, H, n, D]
    k: torch.Tensor,  # [B, KVH, L, D]
    v: torch.Tensor,  # [B, KVH, L, D]
    mask: torch.Tensor | None,  # [B or 1, 1, n, L] True where visible; every query sees at least one key
    scale: float,
    sinks: torch.Tensor | None = None,  # [H] raw logits
    logit_cap: float | None = None,
) -> torch.Tensor:
    """The softmax written out in fp32, as transformers' eager attention: scores times ``scale``, soft-capped to
    ``cap * tanh(s / cap)`` (Gemma 2), masked; with ``sinks``, the softmax over ``[scores..., sink]`` with the sink
    column dropped (GPT-OSS). [B, H, n, D] in q's dtype."""
    b, h, n, d = q.shape
    kvh, keys = k.shape[1], k.shape[2]
    q_grouped = q.float().reshape(b, kvh, (h // kvh) * n, d)  # query head h reads kv head h // group
    scores = (q_grouped @ k.float().transpose(-1, -2)).view(b, h, n, keys) * scale  # [B, H, n, L]
    if logit_cap is not None:
        scores = torch.tanh(scores / logit_cap) * logit_cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = scores.softmax(dim=-1)
    else:
        logits = torch.cat([scores, sinks.float().view(1, h, 1, 1).expand(b, h, n, 1)], dim=-1)
        logits = logits - logits.amax(dim=-1, keepdim=True)
        probs = logits.softmax(dim=-1)[..., :-1]  # [B, H, n, L]: the sink's share dropped
    out = probs.reshape(b, kvh, -1, keys) @ v.float()  # [B, KVH, group * n, D]
    return out.view(b, h, n, d).to(q.dtype)


def _explicit(layer: RadixAttention) -> bool:
    """Whether the layer's softmax is written out (SDPA takes neither sinks nor soft-capped scores)."""
    return layer.sinks is not None or layer.logit_cap is not None


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    layer: RadixAttention,
    causal: bool = False,
    kv_scale: KVScale = _UNSCALED,
) -> torch.Tensor:
    """q [..., H, n, D] over k/v [..., KVH, L, D] as read from the pool (``kv_scale``: what they are multiplied
    by): SDPA, or the explicit softmax for a layer with sinks or a cap (q/k/v with a batch dimension then)."""
    if k.dtype != q.dtype:  # FP8: exact in any wider float type
        k, v = k.to(q.dtype), v.to(q.dtype)
    scale = layer.scaling * kv_scale.k
    if _explicit(layer):
        out = attend_explicit(q, k, v, mask, scale, layer.sinks, layer.logit_cap)
    else:
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
    return out * kv_scale.v if kv_scale.v != 1.0 else out


class TorchAttentionBackend(AttentionBackend):
    supports_tree_mask = True
    supports_image_spans = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        meta = self._metadata(batch, batch.req_to_token, batch.req_pool_idxs)
        if batch.full_to_swa is not None:  # hybrid KV pools: the windowed layers read translated slots
            assert batch.swa_req_to_token is not None and batch.swa_req_pool_idxs is not None
            meta.swa = self._metadata(batch, batch.swa_req_to_token, batch.swa_req_pool_idxs)
        batch.attn_metadata = meta

    def _metadata(
        self, batch: ForwardBatch, req_to_token: torch.Tensor, pool_idxs: torch.Tensor
    ) -> _Metadata:
        ext = batch.extend_lens_cpu
        seq = batch.seq_lens_cpu
        starts = np.concatenate(([0], np.cumsum(ext)[:-1]))
        decode_rows = np.nonzero(ext == 1)[0]
        decode = None
        if len(decode_rows):
            rows = torch.from_numpy(decode_rows).to(self.device)
            max_len = int(seq[decode_rows].max())
            kv_slots = req_to_token[pool_idxs[rows], :max_len]
            mask = None
            if int(seq[decode_rows].min()) < max_len:  # ragged: mask the padding
                lens = batch.seq_lens[rows]
                valid = torch.arange(max_len, device=self.device)[None, :] < lens[:, None]
                # Padding reads the reserved slot 0 (finite), never a stale slot that may hold garbage.
                kv_slots = kv_slots.masked_fill(~valid, 0)
                mask = valid[:, None, None, :]
            decode = _DecodePart(
                token_idx=torch.from_numpy(starts[decode_rows]).to(self.device),
                kv_slots=kv_slots,
                mask=mask,
                pool_rows=pool_idxs[rows],
                seq_lens=seq[decode_rows],
            )
        extends = []
        tree = batch.tree_mask
        for r in np.nonzero(ext != 1)[0]:
            n, s, prefix = int(ext[r]), int(seq[r]), int(batch.prefix_lens_cpu[r])
            mask = None
            in_tree = tree is not None and tree.offsets[r] >= 0
            if in_tree:  # the whole prefix, then the draft tree's ancestors-or-self
                assert tree is not None
                off = int(tree.offsets[r])
                own = tree.mask[off : off + n * n].view(n, n)
                mask = torch.cat([own.new_ones(n, prefix), own], dim=1)
            elif prefix:
                q_pos = torch.arange(prefix, s, device=self.device)
                mask = torch.arange(s, device=self.device)[None, :] <= q_pos[:, None]
            ends = image_key_ends(batch, int(r), prefix, s)
            if ends is not None and not in_tree:  # an image's tokens see the whole image
                key_end = torch.from_numpy(ends).to(self.device)
                mask = torch.arange(s, device=self.device)[None, :] < key_end[:, None]
            extends.append(
                _ExtendPart(int(starts[r]), n, req_to_token[pool_idxs[r], :s], mask, in_tree, ends)
            )
        return _Metadata(decode, extends, req_to_token)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        batch: ForwardBatch,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        num_tokens = q.shape[0]
        h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        q = q.view(num_tokens, h, d)
        if not kv_stored:
            loc = batch.kv_indices(layer)[0]
            batch.kv_pool.set_kv(layer.layer_id, loc, k.view(-1, kvh, d), v.view(-1, kvh, d))
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        kv_scale = batch.kv_pool.scales[layer.layer_id]
        meta: _Metadata = batch.attn_metadata
        if batch.uses_swa_pool(layer):
            assert meta.swa is not None
            meta = meta.swa
        if layer.sliding_window is not None or _explicit(layer):
            meta = meta.variant(layer.sliding_window, h)
        only_decode = not meta.extends  # then the decode rows are all tokens, in order
        out = q if only_decode else torch.empty_like(q)  # [T, H, D]
        if meta.decode is not None:
            dec = meta.decode
            qd = (q if only_decode else q[dec.token_idx]).unsqueeze(2)  # [Bd, H, 1, D]
            shape = (*dec.kv_slots.shape, kvh, d)  # [Bd, L, KVH, D]; index_select beats advanced indexing
            kd = k_buf.index_select(0, dec.kv_slots.view(-1)).view(shape).transpose(1, 2)  # [Bd, KVH, L, D]
            vd = v_buf.index_select(0, dec.kv_slots.view(-1)).view(shape).transpose(1, 2)
            od = _attend(qd, kd, vd, dec.mask, layer, kv_scale=kv_scale)  # [Bd, H, 1, D]
            if only_decode:
                return od.view(num_tokens, h * d)
            out[dec.token_idx] = od.squeeze(2).to(out.dtype)
        for part in meta.extends:
            sl = slice(part.token_start, part.token_start + part.num_tokens)
            qe = q[sl].transpose(0, 1)  # [H, n, D]
            ke = k_buf.index_select(0, part.kv_slots).transpose(0, 1)  # [KVH, L, D]
            ve = v_buf.index_select(0, part.kv_slots).transpose(0, 1)
            if _explicit(layer):  # the explicit softmax takes a batch dimension
                oe = _attend(qe[None], ke[None], ve[None], part.mask[None, None], layer, kv_scale=kv_scale)[0]
            else:
                oe = _attend(qe, ke, ve, part.mask, layer, part.mask is None, kv_scale)  # [H, n, D]
            out[sl] = oe.transpose(0, 1).to(out.dtype)
        return out.view(num_tokens, h * d)
