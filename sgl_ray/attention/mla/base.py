"""The MLA backend seam, and the extend (prefill) path every MLA backend shares.

Contract of :meth:`MLAAttentionBackend.forward_mla` (``layer`` a
:class:`~sgl_ray.attention.mla.layer.LatentAttention`; head counts per tensor-parallel rank):

* inputs, for the step's T new tokens: ``q_nope`` [T, H, qk_nope_head_dim], ``q_pe`` [T, H, qk_rope_head_dim]
  (rotated), ``latent`` [T, kv_lora_rank + qk_rope_head_dim] (the normed ``c`` then the rotated ``k_pe``);
* it first stores ``latent`` at ``batch.out_cache_loc`` of layer ``layer.layer_id`` in ``batch.kv_pool`` (an
  :class:`~sgl_ray.mem_cache.kv_pool.MLAKVPool`), then returns ``[T, H, v_head_dim]``: token ``i`` of request ``r``
  attends to request ``r``'s latents ``0 .. prefix_len[r] + i`` with per-head keys ``[W_UK c | k_pe]``, values
  ``W_UV c`` (``layer.expand``) and softmax scale ``layer.scaling`` — computed absorbed or up-projected, as the
  backend likes (see the package docstring);
* the metadata contract of :class:`~sgl_ray.attention.base.AttentionBackend` holds (``init_forward_metadata`` once
  per step; CUDA-graph metadata for decode batches where ``supports_cuda_graph``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sgl_ray.attention.base import AttentionBackend

if TYPE_CHECKING:
    from sgl_ray.attention.mla.layer import LatentAttention
    from sgl_ray.runner.forward_batch import ForwardBatch


class ExtendSpan(NamedTuple):
    """One request adding several tokens: their rows in the step, and the latents they see."""

    token_start: int  # first row of the request's new tokens
    num_tokens: int
    kv_slots: torch.Tensor  # [S] pool slots of its whole sequence (prefix, then the new tokens)
    mask: torch.Tensor | None  # [num_tokens, S] True where visible; None: plain causal (no prefix)
    tree: bool = False  # the mask is a draft tree's (``batch.tree_mask``), not causal


class MLAAttentionBackend(AttentionBackend):
    """An attention backend that also runs multi-head latent attention (see the module docstring)."""

    @abstractmethod
    def forward_mla(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        layer: LatentAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor: ...


def extend_spans(batch: ForwardBatch) -> list[ExtendSpan]:
    """The :class:`ExtendSpan` of every request of ``batch`` adding more than one token (no host sync). A request
    verifying a draft tree (``batch.tree_mask``, ``attention.base.TreeMask``) sees its whole prefix, then its own
    new tokens as the tree's mask says (each node its ancestors and itself)."""
    ext, prefix = batch.extend_lens_cpu, batch.prefix_lens_cpu
    starts = np.concatenate(([0], np.cumsum(ext)[:-1]))
    device = batch.req_to_token.device
    tree = batch.tree_mask
    spans = []
    for r in np.nonzero(ext > 1)[0]:
        n, p = int(ext[r]), int(prefix[r])
        seq_len = p + n
        slots = batch.req_to_token.index_select(0, batch.req_pool_idxs[r : r + 1])[0, :seq_len]
        mask = None
        in_tree = tree is not None and tree.offsets[r] >= 0
        if in_tree:
            assert tree is not None
            off = int(tree.offsets[r])
            own = tree.mask[off : off + n * n].view(n, n).to(device)
            mask = torch.cat([own.new_ones(n, p), own], dim=1)
        elif p:
            q_pos = torch.arange(p, seq_len, device=device)
            mask = torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]
        spans.append(ExtendSpan(int(starts[r]), n, slots, mask, in_tree))
    return spans


def attend_extends(
    q_nope: torch.Tensor,  # [T, H, nope]
    q_pe: torch.Tensor,  # [T, H, R]
    latents: torch.Tensor,  # [num_slots, C + R] the layer's pool buffer, this step's latents stored
    spans: Iterable[ExtendSpan],
    layer: LatentAttention,
    out: torch.Tensor,  # [T, H, v]; each span's rows are written
) -> None:
    """Extend rows, up-projected: each request's latents become per-head keys ``[k_nope | k_pe]`` and values (as
    transformers computes them), then one causal SDPA per request, offset by its cached prefix."""
    c_dim = layer.kv_lora_rank
    for span in spans:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        lat = latents.index_select(0, span.kv_slots)  # [S, C + R]
        k_nope, v = layer.expand(lat[:, :c_dim])  # [S, H, nope], [S, H, v]
        k_pe = lat[:, None, c_dim:].expand(-1, k_nope.shape[1], -1)  # [S, H, R], shared by the heads
        k = torch.cat([k_nope, k_pe], dim=-1)
        q = torch.cat([q_nope[rows], q_pe[rows]], dim=-1)  # [n, H, nope + R]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=layer.scaling,
        )  # [H, n, v]
        out[rows] = o.transpose(0, 1).to(out.dtype)
