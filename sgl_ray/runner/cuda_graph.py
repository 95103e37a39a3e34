"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is dominated by kernel launches (hundreds per step, each a few microseconds of CPU
time), not by the GPU work. :class:`CudaGraphRunner` captures the whole forward pass plus the LM head once per batch
size of a ladder (largest first, all in one memory pool) and replays it: one launch per step.

Static inputs live in one ``[5, max_bs]`` int64 device buffer, filled by one host-to-device copy per step::

    row 0 input_ids | row 1 positions | row 2 out_cache_loc | row 3 req_pool_idxs | row 4 seq_lens
    columns 0 .. bs-1: the real requests;  bs .. graph_bs-1: padding (token 0 at position 0, written to the
    reserved KV slot 0, reading one cached token of request slot 0 — harmless, and the rows are dropped)

The attention backend gives graph-safe metadata over the same buffers (``graph_metadata``): its kernels read the
sequence lengths from device memory and use a launch grid fixed at capture time.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time

import numpy as np
import torch

from sgl_ray.attention.base import AttentionBackend
from sgl_ray.mem_cache.kv_pool import KVPool
from sgl_ray.runner.forward_batch import ForwardBatch
from sgl_ray.scheduler.plan import FUTURE_TOKEN

logger = logging.getLogger(__name__)

_INPUT, _POS, _LOC, _REQ, _SEQ = range(5)


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
    >>> if graphs.can_run(batch_size): logits = graphs.replay(plan)  # doctest: +SKIP  # [bs, vocab] fp32
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
    ) -> None:
        self.model = model
        self.attn_backend = attn_backend
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.last_tokens = last_tokens
        self.context_length = context_length
        self.batch_sizes = batch_size_ladder(max_bs)
        self.max_bs = self.batch_sizes[-1]
        device = req_to_token.device
        self.ints = torch.zeros((5, self.max_bs), dtype=torch.int64, device=device)
        self.ints[_SEQ].fill_(1)
        # Two host buffers in turn: with overlap scheduling a step is filled while the previous one's copy may
        # still wait in the stream; each buffer's event marks its copy done.
        self._hosts = [torch.zeros((5, self.max_bs), dtype=torch.int64).pin_memory() for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._arange = torch.arange(self.max_bs, dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._pool = None
        self.num_replays = 0
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(device)[0]
        for bs in reversed(self.batch_sizes):  # largest first: smaller graphs reuse its pool memory
            self._capture(bs)
        self.capture_s = time.perf_counter() - t0
        self.pool_bytes = max(0, free_before - torch.cuda.mem_get_info(device)[0])
        logger.info(
            "captured %d CUDA graphs (batch sizes %s..%s) in %.1f s, %.0f MiB",
            len(self.batch_sizes),
            self.batch_sizes[0],
            self.max_bs,
            self.capture_s,
            self.pool_bytes / 2**20,
        )

    def _batch(self, bs: int) -> ForwardBatch:
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
        )
        batch.attn_metadata = self.attn_backend.graph_metadata(batch, self.context_length)
        return batch

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        ids = batch.input_ids  # FUTURE_TOKEN entries: the slot's token sampled by the previous step
        ids = torch.where(ids == FUTURE_TOKEN, self.last_tokens[batch.req_pool_idxs], ids)
        return self.model.compute_logits(self.model(dataclasses.replace(batch, input_ids=ids)))

    @torch.inference_mode()
    def _capture(self, bs: int) -> None:
        batch = self._batch(bs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels and warm up cuBLAS outside the capture
                self._forward(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            logits = self._forward(batch)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[bs] = graph
        self._logits[bs] = logits

    def can_run(self, batch_size: int) -> bool:
        return 0 < batch_size <= self.max_bs

    def replay(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        out_cache_loc: np.ndarray,
        req_pool_idxs: np.ndarray,
    ) -> torch.Tensor:
        """Enqueue one decode step of ``bs`` requests (one new token each). Returns the logits ``[bs, vocab]``
        (a view of the graph's output buffer: valid until the next replay)."""
        bs = len(input_ids)
        gbs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        turn = self.num_replays % 2
        if (copied := self._copied[turn]) is not None:
            copied.synchronize()  # two steps back: long done unless the device is far behind
        host_t = self._hosts[turn]
        host = host_t.numpy()
        host[_INPUT, :bs] = input_ids
        host[_POS, :bs] = positions
        host[_LOC, :bs] = out_cache_loc
        host[_REQ, :bs] = req_pool_idxs
        host[_SEQ, :bs] = positions + 1
        host[:, bs:gbs] = 0
        host[_SEQ, bs:gbs] = 1
        self.ints[:, :gbs].copy_(host_t[:, :gbs], non_blocking=True)
        self._copied[turn] = event = torch.cuda.Event()
        event.record()
        ints = self.ints
        self.req_to_token[ints[_REQ, :bs], ints[_POS, :bs]] = ints[_LOC, :bs]
        self._graphs[gbs].replay()
        self.num_replays += 1
        return self._logits[gbs][:bs]
