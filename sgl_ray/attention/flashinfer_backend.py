"""Attention over the paged KV pool with FlashInfer's kernels (optional: ``attention_backend="flashinfer"``).

FlashInfer reads the pool as a paged cache of page size 1 (``[slots, 1, kv_heads, head_dim]``, layout NHD), so
a request's page indices are its ``req_to_token`` row. Per step, :meth:`FlashInferAttentionBackend.
init_forward_metadata` builds the flat index list on the device (no host sync: every length is known on the host)
and plans one wrapper: the decode wrapper when every request adds one token, else the prefill wrapper, which takes
decode rows as extends of length 1. Planning is lazy (on the step's first layer), because the head counts come
with the layer. Causal masking in FlashInfer's prefill is aligned to the end of the KV, which is exactly "full
over the prefix, causal over the new tokens".

The kernels are compiled by FlashInfer on first use (JIT, with nvcc) and cached on disk. CUDA graphs are not
supported yet: FlashInfer plans each batch on the host, outside the graph, which the graph runner has no hook for.

Example (on a CUDA machine with ``flashinfer-python`` installed)::

    >>> backend = FlashInferAttentionBackend(torch.device("cuda"))  # doctest: +SKIP
    >>> backend.init_forward_metadata(batch)  # doctest: +SKIP
    >>> out = backend.forward(q, k, v, layer, batch)  # doctest: +SKIP  # [T, H * D]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sgl_ray.attention.base import AttentionBackend
from sgl_ray.errors import InvalidRequestError

if TYPE_CHECKING:
    from sgl_ray.layers.attention import RadixAttention
    from sgl_ray.runner.forward_batch import ForwardBatch

WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's recommended split-KV workspace


@dataclass
class _Metadata:
    decode: bool  # every request adds one token: the decode wrapper
    qo_indptr: torch.Tensor  # [B + 1] int32, host
    kv_indptr: torch.Tensor  # [B + 1] int32, host
    kv_indices: torch.Tensor  # [sum(seq_lens)] int32, device
    planned: tuple[int, int, int, torch.dtype, float] | None = (
        None  # (heads, kv heads, head_dim, dtype, scale)
    )


class FlashInferAttentionBackend(AttentionBackend):
    supports_cuda_graph = False

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise InvalidRequestError(
                "attention_backend: flashinfer runs on CUDA devices only", param="attention_backend"
            )
        try:
            import flashinfer
        except ImportError as e:
            raise InvalidRequestError(
                f"attention_backend: flashinfer is not installed ({e}); pip install flashinfer-python",
                param="attention_backend",
            ) from None
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self._ones: torch.Tensor = torch.ones(0, dtype=torch.int32)  # last page lengths (page size 1), host

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        ext = batch.extend_lens_cpu.astype(np.int64)
        seq = batch.prefix_lens_cpu.astype(np.int64) + ext
        total = int(seq.sum())
        kv_indptr = np.zeros(len(seq) + 1, dtype=np.int32)
        np.cumsum(seq, out=kv_indptr[1:])
        qo_indptr = np.zeros(len(ext) + 1, dtype=np.int32)
        np.cumsum(ext, out=qo_indptr[1:])
        # kv_indices[j] = req_to_token[req of j, position of j]: built from device tensors, sizes from the host
        seq_dev = batch.seq_lens.to(torch.int64)
        rows = torch.repeat_interleave(batch.req_pool_idxs.to(torch.int64), seq_dev, output_size=total)
        starts = torch.repeat_interleave(torch.cumsum(seq_dev, 0) - seq_dev, seq_dev, output_size=total)
        pos = torch.arange(total, device=self.device) - starts
        kv_indices = batch.req_to_token[rows, pos].to(torch.int32)
        batch.attn_metadata = _Metadata(
            decode=bool((ext == 1).all()),
            qo_indptr=torch.from_numpy(qo_indptr),
            kv_indptr=torch.from_numpy(kv_indptr),
            kv_indices=kv_indices,
        )
        if len(self._ones) < len(seq):
            self._ones = torch.ones(max(len(seq), 2 * len(self._ones)), dtype=torch.int32)

    def _plan(self, meta: _Metadata, layer: RadixAttention, dtype: torch.dtype) -> None:
        key = (layer.num_heads, layer.num_kv_heads, layer.head_dim, dtype, float(layer.scaling))
        if meta.planned == key:
            return
        h, kvh, d = key[:3]
        last = self._ones[: len(meta.kv_indptr) - 1]
        common: dict[str, Any] = dict(q_data_type=dtype, kv_data_type=dtype, sm_scale=key[4])
        if meta.decode:
            self._decode.plan(meta.kv_indptr, meta.kv_indices, last, h, kvh, d, 1, **common)
        else:
            self._prefill.plan(
                meta.qo_indptr, meta.kv_indptr, meta.kv_indices, last, h, kvh, d, 1, causal=True, **common
            )
        meta.planned = key

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
        if not kv_stored:
            batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k.view(-1, kvh, d), v.view(-1, kvh, d))
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        paged = (k_buf.view(-1, 1, kvh, d), v_buf.view(-1, 1, kvh, d))
        meta: _Metadata = batch.attn_metadata
        self._plan(meta, layer, q.dtype)
        wrapper = self._decode if meta.decode else self._prefill
        out = wrapper.run(q.contiguous().view(num_tokens, h, d), paged)
        return out.view(num_tokens, h * d)
