"""Batched heterogeneous LoRA (S-LoRA / Punica style): each request of a batch may use a different adapter slot.

Every wrapped projection holds a fixed pool of adapter slots, ``A: [S, N, K]`` and ``B: [S, O, N]`` (``N`` =
sections × max rank, block-diagonal for fused projections, scaling folded into B, unused rank rows zero). For a
batch whose tokens are grouped in segments (one per request, contiguous), the backend adds, for every token t of a
segment bound to slot s::

    out[t] += (x[t] @ A[s].T) @ B[s].T          # shrink to N, expand to O

Tokens of requests without an adapter (slot -1) are left alone (no segment is built for them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from sgl_ray.transfer import to_device


class LoRABatch:
    """Segments of one forward batch that use an adapter; built once per step on the host.

    ``seg_*`` (device, int32) describe runs of consecutive tokens sharing a slot (adjacent requests with the same
    slot merge, so a decode batch sorted by adapter has one segment per adapter). ``groups`` gathers the token
    rows of each distinct slot (for the torch backend; built on first use).
    """

    def __init__(self, start: np.ndarray, length: np.ndarray, slot: np.ndarray, device: torch.device) -> None:
        self._np = (start, length, slot)
        self.device = device
        segs = to_device(np.stack(self._np).astype(np.int32), device)  # [3, G]: one host-to-device copy
        self.seg_start, self.seg_len, self.seg_slot = segs  # [G] each
        self.max_seg_len = int(length.max())
        self._groups: list[tuple[int, slice | torch.Tensor]] | None = None

    @property
    def num_segments(self) -> int:
        return len(self._np[0])

    @property
    def groups(self) -> list[tuple[int, slice | torch.Tensor]]:
        """(slot, its token rows) per distinct slot: a slice when they are one run, else an index tensor [n]."""
        if self._groups is None:
            start, length, slots = self._np
            self._groups = []
            for slot in np.unique(slots):
                (runs,) = np.nonzero(slots == slot)
                if len(runs) == 1:
                    a, n = int(start[runs[0]]), int(length[runs[0]])
                    self._groups.append((int(slot), slice(a, a + n)))
                    continue
                rows = np.concatenate([np.arange(start[i], start[i] + length[i]) for i in runs])
                self._groups.append((int(slot), torch.from_numpy(rows).to(self.device)))
        return self._groups

    @classmethod
    def from_requests(
        cls, slots: np.ndarray, extend_lens: np.ndarray, device: torch.device
    ) -> LoRABatch | None:
        """``slots[r]``: adapter slot of request r (-1: none); ``extend_lens[r]``: its tokens this step.
        None when no request uses an adapter."""
        if not len(slots) or (slots < 0).all():
            return None
        starts = np.concatenate(([0], np.cumsum(extend_lens)[:-1])).astype(np.int64)
        return cls(*_runs(starts, extend_lens, slots), device)


class GraphLoRABatch:
    """Segments in static device buffers, for a decode batch replayed from a CUDA graph: ``num_segments`` entries
    (one per adapter slot), of which the unused ones have length 0, each at most ``max_seg_len`` tokens (the
    graph's batch size), so every launch grid is fixed at capture. Filled by the graph runner before a replay."""

    def __init__(
        self, seg_start: torch.Tensor, seg_len: torch.Tensor, seg_slot: torch.Tensor, max_seg_len: int
    ) -> None:
        self.seg_start, self.seg_len, self.seg_slot = seg_start, seg_len, seg_slot
        self.num_segments, self.max_seg_len = len(seg_start), max_seg_len


def decode_segments(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, slot) of the runs of a decode batch (one token per request) that use an adapter."""
    return _runs(np.arange(len(slots), dtype=np.int64), np.ones(len(slots), dtype=np.int64), slots)


def _runs(starts: np.ndarray, extend_lens: np.ndarray, slots: np.ndarray):
    keep = (slots >= 0) & (extend_lens > 0)
    s_start, s_len, s_slot = starts[keep], extend_lens[keep], slots[keep]
    new_run = np.ones(len(s_slot), dtype=bool)
    new_run[1:] = (s_slot[1:] != s_slot[:-1]) | (s_start[1:] != s_start[:-1] + s_len[:-1])
    run_id = np.cumsum(new_run) - 1
    length = np.bincount(run_id, weights=s_len).astype(np.int64)
    return s_start[new_run], length, s_slot[new_run]


class LoRABackend(ABC):
    """Contract: ``apply`` adds the LoRA delta of every adapter segment of ``batch`` to ``out`` in place and
    leaves the other rows untouched. ``x: [T, K]``, ``out: [T, O]``, ``a: [S, N, K]``, ``b: [S, O, N]``.
    Backends with ``supports_cuda_graph`` also take a :class:`GraphLoRABatch` and then never sync with the
    host."""

    supports_cuda_graph = False

    @abstractmethod
    def apply(
        self, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch
    ) -> None: ...


class TorchLoRABackend(LoRABackend):
    """One gathered GEMM pair per distinct slot in the batch (CPU, and the reference for the GPU kernel)."""

    def apply(self, x, out, a, b, batch):
        for slot, rows in batch.groups:
            if isinstance(rows, slice):  # one run of tokens: views, no gather
                out[rows] += (x[rows] @ a[slot].t()) @ b[slot].t()
                continue
            xs = x.index_select(0, rows)  # [n, K]
            delta = (xs @ a[slot].t()) @ b[slot].t()  # [n, O]
            out.index_add_(0, rows, delta.to(out.dtype))


_BACKENDS = {
    "torch": ("sgl_ray.lora.backend", "TorchLoRABackend"),
    "triton": ("sgl_ray.lora.triton_backend", "TritonLoRABackend"),
}


def create_lora_backend(name: str | None, device: torch.device) -> LoRABackend:
    """``torch`` (CPU default) or ``triton`` (CUDA default)."""
    import importlib

    from sgl_ray.errors import InvalidRequestError

    name = name or ("triton" if device.type == "cuda" else "torch")
    if name not in _BACKENDS:
        raise InvalidRequestError(f"lora_backend must be one of {sorted(_BACKENDS)}", param="lora_backend")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)()
