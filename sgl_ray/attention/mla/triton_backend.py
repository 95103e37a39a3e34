"""MLA on CUDA: decode rows through the Triton split-KV kernel (``triton_decode``), extend rows up-projected
(``base.attend_extends``, SDPA per request).

The decode metadata (and the CUDA-graph metadata) is the dense Triton backend's; this backend adds the extending
requests' spans. A decode step costs three kernels around the attention: ``W_UK`` into the query (one batched
GEMM), the two Triton stages, ``W_UV`` out of the latent output (one batched GEMM, reading the kernel's
head-major output without a copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sgl_ray.attention.mla.base import ExtendSpan, MLAAttentionBackend, attend_extends, extend_spans
from sgl_ray.attention.mla.triton_decode import BLOCK_H, mla_block_n, mla_decode_attention
from sgl_ray.attention.triton_backend import TritonAttentionBackend
from sgl_ray.attention.triton_kernels import DecodeConfig

if TYPE_CHECKING:
    from sgl_ray.attention.mla.layer import LatentAttention
    from sgl_ray.runner.forward_batch import ForwardBatch


@dataclass(frozen=True)
class _Metadata:
    decode: Any  # the Triton backend's decode part (rows, tokens, seq_lens, num, max_seq_len) or None
    extends: list[ExtendSpan]


class TritonMLABackend(TritonAttentionBackend, MLAAttentionBackend):
    """Example (on a CUDA machine; the runner creates it for MLA models through ``create_attention_backend``)::

    >>> backend = TritonMLABackend(torch.device("cuda"))  # doctest: +SKIP
    >>> backend.init_forward_metadata(batch)  # doctest: +SKIP
    >>> out = backend.forward_mla(q_nope, q_pe, latent, layer, batch)  # [T, H, v]  # doctest: +SKIP
    """

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        super().init_forward_metadata(batch)
        batch.attn_metadata = _Metadata(batch.attn_metadata.decode, extend_spans(batch))

    def graph_metadata(self, batch: ForwardBatch, max_seq_len: int) -> _Metadata:
        return _Metadata(super().graph_metadata(batch, max_seq_len).decode, [])

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
        meta: _Metadata = batch.attn_metadata
        num_tokens, dec = q_nope.shape[0], meta.decode
        if dec is not None and dec.num == num_tokens:  # decode rows only: the step's tokens, in order
            return self._decode(q_nope, q_pe, latents, layer, batch)
        out = self._new_buffer((num_tokens, layer.num_heads, layer.v_head_dim), q_nope.dtype)
        if dec is not None:
            rows = dec.tokens.long()
            out[rows] = self._decode(q_nope[rows], q_pe[rows], latents, layer, batch)
        attend_extends(q_nope, q_pe, latents, meta.extends, layer, out)
        return out

    def _decode(
        self,
        q_nope: torch.Tensor,  # [Bd, H, nope] the decode rows
        q_pe: torch.Tensor,
        latents: torch.Tensor,
        layer: LatentAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        dec = batch.attn_metadata.decode
        h = layer.num_heads
        # head-major, so that W_UV's batched GEMM reads it as is
        out = self._new_buffer((h, dec.num, layer.kv_lora_rank), q_nope.dtype).transpose(0, 1)
        config = DecodeConfig(mla_block_n(layer.latent_dim, q_nope.dtype))
        mla_decode_attention(
            layer.absorb(q_nope),
            q_pe,
            latents,
            out,
            batch.req_to_token,
            batch.req_pool_idxs,
            dec.rows,
            dec.seq_lens,
            self._num_splits(dec, -(-h // BLOCK_H), config),
            layer.scaling,
            self._new_buffer,
        )
        return layer.project_out(out)  # [Bd, H, v]
