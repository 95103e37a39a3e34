"""Attention over the paged KV pool with ``torch.nn.functional.scaled_dot_product_attention`` (CPU default).

Requests adding one token (decode) run as one padded batch; requests adding several (prefill / extend) run one by
one with a causal mask offset by their cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sgl_ray.attention.base import AttentionBackend

if TYPE_CHECKING:
    from sgl_ray.layers.attention import RadixAttention
    from sgl_ray.runner.forward_batch import ForwardBatch


@dataclass
class _DecodePart:
    token_idx: torch.Tensor  # [Bd] rows of the token array
    kv_slots: torch.Tensor  # [Bd, L] KV slots, padded with slot 0
    mask: torch.Tensor | None  # [Bd, 1, 1, L] True where a key is real; None when no request is padded


@dataclass
class _ExtendPart:
    token_start: int
    num_tokens: int
    kv_slots: torch.Tensor  # [seq_len]
    mask: torch.Tensor | None  # [num_tokens, seq_len], None when the plain causal mask applies


@dataclass
class _Metadata:
    decode: _DecodePart | None
    extends: list[_ExtendPart]


class TorchAttentionBackend(AttentionBackend):
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        ext = batch.extend_lens_cpu
        seq = batch.seq_lens_cpu
        starts = np.concatenate(([0], np.cumsum(ext)[:-1]))
        decode_rows = np.nonzero(ext == 1)[0]
        decode = None
        if len(decode_rows):
            rows = torch.from_numpy(decode_rows).to(self.device)
            max_len = int(seq[decode_rows].max())
            kv_slots = batch.req_to_token[batch.req_pool_idxs[rows], :max_len]
            mask = None
            if int(seq[decode_rows].min()) < max_len:  # ragged: mask the padding
                lens = batch.seq_lens[rows]
                valid = torch.arange(max_len, device=self.device)[None, :] < lens[:, None]
                # Padding reads the reserved slot 0 (finite), never a stale slot that may hold garbage.
                kv_slots = kv_slots.masked_fill(~valid, 0)
                mask = valid[:, None, None, :]
            decode = _DecodePart(
                token_idx=torch.from_numpy(starts[decode_rows]).to(self.device), kv_slots=kv_slots, mask=mask
            )
        extends = []
        for r in np.nonzero(ext != 1)[0]:
            n, s, prefix = int(ext[r]), int(seq[r]), int(batch.prefix_lens_cpu[r])
            mask = None
            if prefix:
                q_pos = torch.arange(prefix, s, device=self.device)
                mask = torch.arange(s, device=self.device)[None, :] <= q_pos[:, None]
            extends.append(
                _ExtendPart(int(starts[r]), n, batch.req_to_token[batch.req_pool_idxs[r], :s], mask)
            )
        batch.attn_metadata = _Metadata(decode, extends)

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
            batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k.view(-1, kvh, d), v.view(-1, kvh, d))
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        meta: _Metadata = batch.attn_metadata
        gqa = h != kvh
        only_decode = not meta.extends  # then the decode rows are all tokens, in order
        out = q if only_decode else torch.empty_like(q)  # [T, H, D]
        if meta.decode is not None:
            dec = meta.decode
            qd = (q if only_decode else q[dec.token_idx]).unsqueeze(2)  # [Bd, H, 1, D]
            shape = (*dec.kv_slots.shape, kvh, d)  # [Bd, L, KVH, D]; index_select beats advanced indexing
            kd = k_buf.index_select(0, dec.kv_slots.view(-1)).view(shape).transpose(1, 2)  # [Bd, KVH, L, D]
            vd = v_buf.index_select(0, dec.kv_slots.view(-1)).view(shape).transpose(1, 2)
            od = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=dec.mask, scale=layer.scaling, enable_gqa=gqa
            )  # [Bd, H, 1, D]
            if only_decode:
                return od.view(num_tokens, h * d)
            out[dec.token_idx] = od.squeeze(2).to(out.dtype)
        for part in meta.extends:
            sl = slice(part.token_start, part.token_start + part.num_tokens)
            qe = q[sl].transpose(0, 1)  # [H, n, D]
            ke = k_buf.index_select(0, part.kv_slots).transpose(0, 1)  # [KVH, S, D]
            ve = v_buf.index_select(0, part.kv_slots).transpose(0, 1)
            oe = F.scaled_dot_product_attention(
                qe,
                ke,
                ve,
                attn_mask=part.mask,
                is_causal=part.mask is None,
                scale=layer.scaling,
                enable_gqa=gqa,
            )  # [H, n, D]
            out[sl] = oe.transpose(0, 1).to(out.dtype)
        return out.view(num_tokens, h * d)
