"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is dominated by kernel launches (hundreds per step, each a few microseconds of CPU
time), not by the GPU work. :class:`CudaGraphRunner` captures the whole forward pass plus the LM head once per batch
size of a ladder (largest first, all in one memory pool) and replays it: one launch per step.

Static inputs live in one int64 device buffer, filled by one host-to-device copy per step::

    [5, max_bs]: row 0 input_ids | row 1 positions | row 2 out_cache_loc | row 3 req_pool_idxs | row 4 seq_lens
        (+ row 5 rope_offset for models that read it: M-RoPE's ``mrope_delta`` of each image request, else 0)
        columns 0 .. bs-1: the real requests;  bs .. graph_bs-1: padding (token 0 at position 0, written to the
        reserved KV slot 0, reading one cached token of request slot 0 — harmless, and the rows are dropped)
    [3, lora_slots] (with LoRA): start | length | slot of the batch's adapter segments (unused ones: length 0)

The attention backend gives graph-safe metadata over the same buffers (``graph_metadata``): its kernels read the
sequence lengths from device memory and use a launch grid fixed at capture time. A backend that plans on the host
(FlashInfer) does so in ``prepare_graph_replay``, after the step's inputs are in place and before the replay.
A backend may ask for more than one graph per batch size (``graph_seq_lens``), each captured for a longest
sequence; a replay takes the first that fits its batch (Triton: one for short sequences at one or two requests).

With hybrid KV pools (``mem_cache.hybrid_swa``) the batch carries the runner's ``full_to_swa`` map (a persistent
tensor it updates in place between steps): the captured region translates the step's ``out_cache_loc`` through it
(``ForwardBatch.translate_swa``) and the windowed layers' kernels read the request table through it, so every replay
sees the map as the step's plan left it.

With LoRA enabled (and a LoRA backend that supports graphs), a second ladder is captured with the adapter
kernels in it; decode batches where some request uses an adapter replay from that one. A decode batch sorted by
adapter has at most one segment per adapter slot, so the segment grid is fixed by the slot count.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time

import numpy as np
import torch

from sgl_ray.attention.base import AttentionBackend
from sgl_ray.layers.moe.base import MoEBackend
from sgl_ray.lora.backend import GraphLoRABatch, decode_segments
from sgl_ray.lora.weights import LoRAWeights
from sgl_ray.mem_cache.kv_pool import KVPool
from sgl_ray.runner.forward_batch import ForwardBatch
from sgl_ray.scheduler.plan import FUTURE_TOKEN

logger = logging.getLogger(__name__)

_INPUT, _POS, _LOC, _REQ, _SEQ, _ROPE = range(6)
_SEG_START, _SEG_LEN, _SEG_SLOT = range(3)
_Key = tuple[int, bool, int]  # a graph's batch size, whether it has the LoRA kernels, its longest sequence


def batch_size_ladder(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: padding wastes at most ~20% of a replay."""
    sizes = [b for b in (1, 2, 4) if b < max_bs]
    sizes += list(range(8, min(max_bs, 64) + 1, 8)) + list(range(80, max_bs + 1, 16))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sorted(set(sizes))


class CudaGraphRunner:
    """Example (inside :class:`~sgl_ray.runner.model_runner.ModelRunner` on a CUDA device)::

    >>> graphs = CudaGraphRunner(model, backend, kv_pool, req_table.table, last_tokens, 64, 8192)  # doctest: +SKIP
    >>> if graphs.can_run(batch_size):  # doctest: +SKIP
    ...     logits = graphs.replay(ids, positions, out_cache_loc, req_pool_idxs)  # [bs, vocab] fp32
    """

    def __init__(
        self,
        model: torch.nn.Module,
        attn_backend: AttentionBackend,
        kv_pool: KVPool,
        req_to_token: torch.Tensor,
        last_tokens: torch.Tensor,
        max_bs: int,
        context_length: int,
        lora: LoRAWeights | None = None,
        moe_backend: MoEBackend | None = None,
        full_to_swa: torch.Tensor | None = None,
    ) -> None:
        """``full_to_swa``: hybrid KV pools' map from full slots to the windowed layers' (read at every replay)."""
        self.model = model
        self.full_to_swa = full_to_swa
        self.moe_backend = moe_backend
        self.attn_backend = attn_backend
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.last_tokens = last_tokens
        self.context_length = context_length
        self.batch_sizes = batch_size_ladder(max_bs)
        self.max_bs = self.batch_sizes[-1]
        self.lora = lora if lora is not None and lora.ctx.backend.supports_cuda_graph else None
        self.lora_slots = lora.num_slots if self.lora is not None else 0
        device = req_to_token.device
        # M-RoPE models: the rotary's offset per request (``ForwardBatch.rope_offset``); others have no such row
        self.rope_offset = bool(getattr(model, "uses_rope_offset", False))
        self._rows = 6 if self.rope_offset else 5
        n_ints, n_segs = self._rows * self.max_bs, 3 * self.lora_slots
        self._flat = torch.zeros(n_ints + n_segs, dtype=torch.int64, device=device)
        self.ints = self._flat[:n_ints].view(self._rows, self.max_bs)
        self.ints[_SEQ].fill_(1)
        self.segs = self._flat[n_ints:].view(3, self.lora_slots)
        # Two host buffers in turn: with overlap scheduling a step is filled while the previous one's copy may
        # still wait in the stream; each buffer's event marks its copy done.
        self._hosts = [torch.zeros(n_ints + n_segs, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._arange = torch.arange(self.max_bs, dtype=torch.int64, device=device)
        # Per batch size, the longest sequence of each of its graphs (a backend may ask for short-sequence ones).
        self.seq_lens = {
            bs: attn_backend.graph_seq_lens(bs, context_length, kv_pool.head_dim, kv_pool.dtype)
            for bs in self.batch_sizes
        }
        self._graphs: dict[_Key, torch.cuda.CUDAGraph] = {}
        self._logits: dict[_Key, torch.Tensor] = {}
        self._metadata: dict[_Key, object] = {}  # the attention metadata each graph was captured with
        self._pool = None
        self.num_replays = 0
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(device)[0]
        for with_lora in (False, True) if self.lora is not None else (False,):
            for bs in reversed(self.batch_sizes):  # largest first: smaller graphs reuse its pool memory
                for max_len in reversed(self.seq_lens[bs]):
                    self._capture(bs, with_lora, max_len)
        self.capture_s = time.perf_counter() - t0
        self.pool_bytes = max(0, free_before - torch.cuda.mem_get_info(device)[0])
        logger.info(
            "captured %d CUDA graphs (batch sizes %s..%s%s) in %.1f s, %.0f MiB",
            len(self._graphs),
            self.batch_sizes[0],
            self.max_bs,
            ", with and without LoRA" if self.lora is not None else "",
            self.capture_s,
            self.pool_bytes / 2**20,
        )

    def _batch(self, bs: int, max_len: int) -> ForwardBatch:
        ints = self.ints
        batch = ForwardBatch(
            input_ids=ints[_INPUT, :bs],
            positions=ints[_POS, :bs],
            out_cache_loc=ints[_LOC, :bs],
            req_pool_idxs=ints[_REQ, :bs],
            seq_lens=ints[_SEQ, :bs],
            extend_start_loc=self._arange[:bs],
            logits_indices=self._arange[:bs],
            prefix_lens_cpu=np.zeros(bs, dtype=np.int64),  # not read inside the graph
            extend_lens_cpu=np.ones(bs, dtype=np.int64),
            kv_pool=self.kv_pool,
            req_to_token=self.req_to_token,
            attn_backend=self.attn_backend,
            moe_backend=self.moe_backend,
            full_to_swa=self.full_to_swa,
            rope_offset=ints[_ROPE, :bs] if self.rope_offset else None,
        )
        batch.attn_metadata = self.attn_backend.graph_metadata(batch, max_len)
        return batch

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        ids = batch.input_ids  # FUTURE_TOKEN entries: the slot's token sampled by the previous step
        ids = torch.where(ids == FUTURE_TOKEN, self.last_tokens[batch.req_pool_idxs], ids)
        batch = dataclasses.replace(batch, input_ids=ids)
        batch.translate_swa()  # hybrid pools: inside the graph, so a replay reads the map as it is then
        return self.model.compute_logits(self.model(batch))

    @torch.inference_mode()
    def _capture(self, bs: int, with_lora: bool, max_len: int) -> None:
        batch = self._batch(bs, max_len)
        if with_lora:  # segments of at most bs tokens, one per slot at most
            assert self.lora is not None
            segs = self.segs
            self.lora.ctx.batch = GraphLoRABatch(segs[_SEG_START], segs[_SEG_LEN], segs[_SEG_SLOT], bs)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels and warm up cuBLAS outside the capture
                    self._forward(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                logits = self._forward(batch)
        finally:
            if with_lora:
                self.lora.ctx.batch = None
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[bs, with_lora, max_len] = graph
        self._logits[bs, with_lora, max_len] = logits
        self._metadata[bs, with_lora, max_len] = batch.attn_metadata

    def can_run(self, batch_size: int, lora_slots: np.ndarray | None = None) -> bool:
        """Whether a decode batch of ``batch_size`` requests (bound to ``lora_slots``, -1: none) can replay."""
        if not 0 < batch_size <= self.max_bs:
            return False
        if lora_slots is None or not (lora_slots >= 0).any():
            return True
        # one segment per slot at most: the batch must be grouped by adapter (the scheduler sorts it so)
        starts = lora_slots >= 0
        starts[1:] &= lora_slots[1:] != lora_slots[:-1]
        return self.lora is not None and int(starts.sum()) <= self.lora_slots

    def replay(
        self,
        input_ids: np.ndarray | torch.Tensor,
        positions: np.ndarray,
        out_cache_loc: np.ndarray,
        req_pool_idxs: np.ndarray,
        lora_slots: np.ndarray | None = None,
        rope_offsets: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Enqueue one decode step of ``bs`` requests (one new token each; ``lora_slots``: each one's adapter
        slot, -1 none; see :meth:`can_run`; ``rope_offsets``: what each adds to its position for the rotary, None:
        0, only for a model that reads ``ForwardBatch.rope_offset``). ``input_ids`` may be a device tensor (a draft
        model's decode passes feed the tokens they just drafted): it is copied in on the device. Returns the logits
        ``[bs, vocab]`` (a view of the graph's output buffer: valid until the next replay)."""
        bs = len(input_ids)
        gbs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        turn = self.num_replays % 2
        if (copied := self._copied[turn]) is not None:
            copied.synchronize()  # two steps back: long done unless the device is far behind
        host_t = self._hosts[turn]
        flat = host_t.numpy()
        rows = self._rows
        host = flat[: rows * self.max_bs].reshape(rows, self.max_bs)
        on_device = isinstance(input_ids, torch.Tensor)
        host[_INPUT, :bs] = 0 if on_device else input_ids
        host[_POS, :bs] = positions
        host[_LOC, :bs] = out_cache_loc
        host[_REQ, :bs] = req_pool_idxs
        host[_SEQ, :bs] = positions + 1
        if self.rope_offset:
            host[_ROPE, :bs] = 0 if rope_offsets is None else rope_offsets
        elif rope_offsets is not None:
            raise ValueError("rotary offsets for a model that does not read them")
        host[:, bs:gbs] = 0
        host[_SEQ, bs:gbs] = 1
        with_lora = lora_slots is not None and bool((lora_slots >= 0).any())
        if with_lora:
            segs = flat[rows * self.max_bs :].reshape(3, self.lora_slots)
            segs[:] = 0
            runs = decode_segments(lora_slots)
            segs[:, : len(runs[0])] = runs
        self._flat.copy_(host_t, non_blocking=True)
        self._copied[turn] = event = torch.cuda.Event()
        event.record()
        ints = self.ints
        if on_device:
            ints[_INPUT, :bs].copy_(input_ids)
        self.req_to_token[ints[_REQ, :bs], ints[_POS, :bs]] = ints[_LOC, :bs]
        lens = self.seq_lens[gbs]
        key = gbs, with_lora, lens[bisect.bisect_left(lens, int(positions.max()) + 1)]
        self.attn_backend.prepare_graph_replay(self._metadata[key], host[_SEQ, :gbs])
        self._graphs[key].replay()
        self.num_replays += 1
        return self._logits[key][:bs]
