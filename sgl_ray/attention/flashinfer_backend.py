"""Attention over the paged KV pool with FlashInfer's kernels (optional: ``attention_backend="flashinfer"``).

FlashInfer reads the pool as a paged cache of page size 1 (``[slots, 1, kv_heads, head_dim]``, layout NHD), so
a request's page indices are its ``req_to_token`` row. Per step, :meth:`FlashInferAttentionBackend.
init_forward_metadata` builds the flat index list on the device (no host sync: every length is known on the host)
and plans one wrapper: the decode wrapper when every request adds one token, else the prefill wrapper, which takes
decode rows as extends of length 1. Planning is lazy (on the step's first layer), because the head counts come
with the layer. Causal masking in FlashInfer's prefill is aligned to the end of the KV, which is exactly "full
over the prefix, causal over the new tokens".

Planning copies small host arrays (index pointers, last-page lengths) to the device. They are staged in pinned
memory (:class:`_PinnedStaging`): from pageable memory such a copy waits for the stream, i.e. for the step in
flight, and overlap scheduling would be lost.

CUDA graphs (decode): every captured batch size gets a decode wrapper of its own over static device buffers
(index pointers, last-page lengths, and one shared index buffer of ``max_bs * context_length`` entries). The
graph is captured after a plan for requests of one token each; before each replay,
:meth:`~FlashInferAttentionBackend.prepare_graph_replay` fills the index buffer from the step's ``req_to_token``
rows on the device and plans the wrapper again for the step's lengths, so the captured kernels read this step's
schedule from the wrapper's workspace.

The kernels are compiled by FlashInfer on first use (JIT, with nvcc) and cached on disk.

Sliding-window layers, attention sinks (GPT-OSS) and soft-capped scores (Gemma 2) are not supported here: one plan
serves every layer of a step (and of a captured graph), whereas window layers would need a plan of their own
(``window_left = window - 1``) beside the full layers' one, and sinks and caps depend on the FlashInfer release and
kernel (none of it checked on a GPU yet). Such a layer raises ``UnsupportedModelError`` at its first forward; the Triton backend serves those models.

An FP8 pool (``kv_cache_dtype``) is planned with ``kv_data_type`` the pool's FP8 type, and each layer's run gets
the pool's K/V scales (``k_scale``, ``v_scale`` of FlashInfer's ``run``).

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
from sgl_ray.errors import InvalidRequestError, UnsupportedModelError

if TYPE_CHECKING:
    from sgl_ray.layers.attention import RadixAttention
    from sgl_ray.runner.forward_batch import ForwardBatch

WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's recommended split-KV workspace

# (heads, kv heads, head_dim, q dtype, kv dtype, scale)
_PlanKey = tuple[int, int, int, torch.dtype, torch.dtype, float]


class _PinnedStaging:
    """Pinned host int32 buffers for the arrays a plan copies to the device, used in turn. A buffer is refilled
    only once the copies queued from it have run (its event, recorded after the plan). Not
    :class:`~sgl_ray.transfer.PinnedRing`: that ring makes the copy itself and frees a span at once, whereas
    here FlashInfer copies later, inside ``plan``, from host tensors it is handed."""

    def __init__(self, turns: int = 4) -> None:
        self._bufs = [torch.empty(0, dtype=torch.int32) for _ in range(turns)]
        self._events: list[torch.cuda.Event | None] = [None] * turns
        self._next = 0

    def stage(self, *arrays: np.ndarray) -> tuple[int, list[torch.Tensor]]:
        """(turn, the arrays as pinned int32 tensors); call :meth:`queued` with the turn after the plan."""
        turn = self._next
        self._next = (turn + 1) % len(self._bufs)
        if (event := self._events[turn]) is not None:
            event.synchronize()  # several steps back: long done unless the device is far behind
            self._events[turn] = None
        need = sum(len(a) for a in arrays)
        if self._bufs[turn].numel() < need:
            self._bufs[turn] = torch.empty(
                max(need, 2 * self._bufs[turn].numel()), dtype=torch.int32
            ).pin_memory()
        out, start = [], 0
        flat = self._bufs[turn].numpy()
        for a in arrays:
            flat[start : start + len(a)] = a
            out.append(self._bufs[turn][start : start + len(a)])
            start += len(a)
        return turn, out

    def queued(self, turn: int) -> None:
        event = self._events[turn] = torch.cuda.Event()
        event.record()


@dataclass
class _Metadata:
    decode: bool  # every request adds one token: a decode wrapper
    qo_indptr: torch.Tensor  # [B + 1] int32, pinned host
    kv_indptr: torch.Tensor  # [B + 1] int32, pinned host
    last_page_len: torch.Tensor  # [B] int32, pinned host (ones: pages of one token)
    kv_indices: torch.Tensor  # [sum(seq_lens)] int32, device
    turn: int  # the staging buffer of the host arrays
    planned: _PlanKey | None = None
    graph: _GraphState | None = None  # a CUDA graph's batch: its own wrapper and static inputs


@dataclass
class _GraphState:
    wrapper: Any  # BatchDecodeWithPagedKVCacheWrapper over static buffers, for one batch size
    req_pool_idxs: torch.Tensor  # [bs] the graph runner's static buffers (this step's values before a replay)
    seq_lens: torch.Tensor  # [bs]
    req_to_token: torch.Tensor
    key: _PlanKey | None = None  # the plan the graph was captured with


class FlashInferAttentionBackend(AttentionBackend):
    supports_cuda_graph = True

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
        self._flashinfer = flashinfer
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=True
        )
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        self._staging = _PinnedStaging()
        self._graph_wrappers: dict[
            int, Any
        ] = {}  # batch size -> its decode wrapper (graphs with/without LoRA)
        self._graph_indices: torch.Tensor | None = None  # shared by the graph wrappers

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        ext = batch.extend_lens_cpu.astype(np.int64)
        seq = batch.prefix_lens_cpu.astype(np.int64) + ext
        total = int(seq.sum())
        # kv_indices[j] = req_to_token[req of j, position of j]: built from device tensors, sizes from the host
        kv_indices = _gather_indices(batch.req_to_token, batch.req_pool_idxs, batch.seq_lens, total)
        turn, (qo_indptr, kv_indptr, last) = self._staging.stage(
            _indptr(ext), _indptr(seq), np.ones(len(seq), dtype=np.int32)
        )
        batch.attn_metadata = _Metadata(
            decode=bool((ext == 1).all()),
            qo_indptr=qo_indptr,
            kv_indptr=kv_indptr,
            last_page_len=last,
            kv_indices=kv_indices,
            turn=turn,
        )

    def graph_metadata(self, batch: ForwardBatch, max_seq_len: int) -> _Metadata:
        """A decode batch of ``batch.batch_size`` rows captured in a CUDA graph (largest size first), planned
        for rows of one token at KV slot 0 (the graph runner's padding) until :meth:`prepare_graph_replay`."""
        bs = batch.batch_size
        if self._graph_indices is None:
            self._graph_indices = torch.zeros(bs * max_seq_len, dtype=torch.int32, device=self.device)
        assert bs * max_seq_len <= len(self._graph_indices), "capture the largest batch size first"
        wrapper = self._graph_wrappers.get(bs)
        if wrapper is None:
            wrapper = self._graph_wrappers[bs] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=self.device),
                paged_kv_indices_buffer=self._graph_indices,
                paged_kv_last_page_len_buffer=torch.ones(bs, dtype=torch.int32, device=self.device),
            )
        ones = np.ones(bs, dtype=np.int64)
        turn, (qo_indptr, kv_indptr, last) = self._staging.stage(
            _indptr(ones), _indptr(ones), np.ones(bs, dtype=np.int32)
        )
        return _Metadata(
            decode=True,
            qo_indptr=qo_indptr,
            kv_indptr=kv_indptr,
            last_page_len=last,
            kv_indices=torch.zeros(bs, dtype=torch.int32, device=self.device),
            turn=turn,
            graph=_GraphState(wrapper, batch.req_pool_idxs, batch.seq_lens, batch.req_to_token),
        )

    def prepare_graph_replay(self, metadata: _Metadata, seq_lens: np.ndarray) -> None:
        """Before a replay: ``seq_lens`` [bs] are the host copies of the graph batch's sequence lengths (padding
        rows included), whose device buffers already hold them, as does ``req_to_token``."""
        graph = metadata.graph
        assert graph is not None and graph.key is not None, "replay of a graph that was never captured"
        seq = seq_lens.astype(np.int64)
        total = int(seq.sum())
        metadata.kv_indices = _gather_indices(graph.req_to_token, graph.req_pool_idxs, graph.seq_lens, total)
        metadata.turn, (metadata.qo_indptr, metadata.kv_indptr, metadata.last_page_len) = self._staging.stage(
            _indptr(np.ones(len(seq), dtype=np.int64)), _indptr(seq), np.ones(len(seq), dtype=np.int32)
        )
        metadata.planned = None
        self._plan_with(metadata, graph.key)

    def _plan(
        self, meta: _Metadata, layer: RadixAttention, dtype: torch.dtype, kv_dtype: torch.dtype
    ) -> None:
        key = (layer.num_heads, layer.num_kv_heads, layer.head_dim, dtype, kv_dtype, float(layer.scaling))
        if meta.planned != key:
            self._plan_with(meta, key)
            if meta.graph is not None:
                meta.graph.key = key

    def _plan_with(self, meta: _Metadata, key: _PlanKey) -> None:
        h, kvh, d = key[:3]
        common: dict[str, Any] = dict(q_data_type=key[3], kv_data_type=key[4], sm_scale=key[5])
        if meta.graph is not None:
            meta.graph.wrapper.plan(
                meta.kv_indptr, meta.kv_indices, meta.last_page_len, h, kvh, d, 1, **common
            )
        elif meta.decode:
            self._decode.plan(meta.kv_indptr, meta.kv_indices, meta.last_page_len, h, kvh, d, 1, **common)
        else:
            self._prefill.plan(
                meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.last_page_len, h, kvh, d, 1,
                causal=True, **common,
            )  # fmt: skip
        self._staging.queued(meta.turn)
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
        check_layer_supported(layer)
        num_tokens = q.shape[0]
        h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        if not kv_stored:
            batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k.view(-1, kvh, d), v.view(-1, kvh, d))
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        paged = (k_buf.view(-1, 1, kvh, d), v_buf.view(-1, 1, kvh, d))
        meta: _Metadata = batch.attn_metadata
        self._plan(meta, layer, q.dtype, k_buf.dtype)
        if meta.graph is not None:
            wrapper = meta.graph.wrapper
        else:
            wrapper = self._decode if meta.decode else self._prefill
        scales: dict[str, float] = {}
        if batch.kv_pool.is_fp8:  # k_scale joins the score scale, v_scale multiplies the output
            kv_scale = batch.kv_pool.scales[layer.layer_id]
            scales = dict(k_scale=kv_scale.k, v_scale=kv_scale.v)
        out = wrapper.run(q.contiguous().view(num_tokens, h, d), paged, **scales)
        return out.view(num_tokens, h * d)


def check_layer_supported(layer: RadixAttention) -> None:
    """Raise ``UnsupportedModelError`` for a layer with a sliding window, attention sinks or soft-capped scores."""
    features = [
        name
        for name, used in (
            (f"a sliding window of {layer.sliding_window} tokens", layer.sliding_window is not None),
            ("attention sinks", layer.sinks is not None),
            ("soft-capped attention scores", layer.logit_cap is not None),
        )
        if used
    ]
    if features:
        raise UnsupportedModelError(
            f"attention_backend flashinfer does not support {' or '.join(features)} (layer {layer.layer_id}); "
            "use attention_backend='triton'"
        )


def _gather_indices(
    req_to_token: torch.Tensor, req_pool_idxs: torch.Tensor, seq_lens: torch.Tensor, total: int
) -> torch.Tensor:
    """[total] int32 KV slots of every request's tokens in order, gathered on the device (``total``, their sum,
    known on the host: no sync)."""
    seq_dev = seq_lens.to(torch.int64)
    rows = torch.repeat_interleave(req_pool_idxs.to(torch.int64), seq_dev, output_size=total)
    starts = torch.repeat_interleave(torch.cumsum(seq_dev, 0) - seq_dev, seq_dev, output_size=total)
    pos = torch.arange(total, device=req_to_token.device) - starts
    return req_to_token[rows, pos].to(torch.int32)


def _indptr(lens: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=out[1:])
    return out
