"""MLA with torch ops (the CPU default): decode rows absorbed, extend rows up-projected (``base.attend_extends``).

The step's metadata is the dense torch backend's (decode rows with their padded ``[Bd, L]`` slot table and mask;
one part per extending request, whose fields are those of :class:`~sgl_ray.attention.mla.base.ExtendSpan`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sgl_ray.attention.mla.base import MLAAttentionBackend, attend_extends
from sgl_ray.attention.torch_backend import TorchAttentionBackend

if TYPE_CHECKING:
    from sgl_ray.attention.mla.layer import LatentAttention
    from sgl_ray.runner.forward_batch import ForwardBatch


def attend_decode(
    q_nope: torch.Tensor,  # [Bd, H, nope]
    q_pe: torch.Tensor,  # [Bd, H, R]
    latents: torch.Tensor,  # [num_slots, C + R]
    kv_slots: torch.Tensor,  # [Bd, L] each row's slots, padded with slot 0
    mask: torch.Tensor | None,  # [Bd, 1, 1, L] True where a key is real; None when no row is padded
    layer: LatentAttention,
) -> torch.Tensor:
    """Absorbed decode: the H query heads of a request attend as H queries of one shared KV head whose keys are the
    latents and whose values are their first C columns. Returns [Bd, H, v]."""
    bd, length = kv_slots.shape
    q = torch.cat([layer.absorb(q_nope), q_pe], dim=-1).unsqueeze(1)  # [Bd, 1, H, C + R]
    kv = latents.index_select(0, kv_slots.reshape(-1)).view(bd, 1, length, -1)  # [Bd, 1, L, C + R]
    o = F.scaled_dot_product_attention(
        q, kv, kv[..., : layer.kv_lora_rank], attn_mask=mask, scale=layer.scaling
    )  # [Bd, 1, H, C]
    return layer.project_out(o.squeeze(1))


class TorchMLABackend(TorchAttentionBackend, MLAAttentionBackend):
    """Example (the runner creates it for MLA models on CPU through ``create_attention_backend``)::

    >>> backend = TorchMLABackend(torch.device("cpu"))  # doctest: +SKIP
    >>> backend.init_forward_metadata(batch)  # doctest: +SKIP
    >>> out = backend.forward_mla(q_nope, q_pe, latent, layer, batch)  # [T, H, v]  # doctest: +SKIP
    """

    def forward_mla(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        layer: LatentAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        batch.kv_pool.set_latent(layer.layer_id, batch.out_cache_loc, latent)
        latents = batch.kv_pool.get_latent(layer.layer_id)
        meta = batch.attn_metadata
        dec = meta.decode
        if dec is not None and not meta.extends:  # decode rows only: they are the step's tokens, in order
            return attend_decode(q_nope, q_pe, latents, dec.kv_slots, dec.mask, layer)
        out = q_nope.new_empty((q_nope.shape[0], layer.num_heads, layer.v_head_dim))
        if dec is not None:
            rows = dec.token_idx
            out[rows] = attend_decode(q_nope[rows], q_pe[rows], latents, dec.kv_slots, dec.mask, layer)
        attend_extends(q_nope, q_pe, latents, meta.extends, layer, out)
        return out
