"""The model runner's side of image inputs: each request slot's :class:`MultimodalInputs` (from its
``NewRequest``), an LRU cache of image embeddings keyed by image hash, and the per-step
:class:`MultimodalBatch` that the model reads from ``ForwardBatch.multimodal``.

A step covers positions ``[prefix, prefix + extend)`` of each request. The rows of that range inside an image take
that image's embedding rows (so a prefill chunk may start or end inside an image, and a prefix-cache hit may end
inside one); the model (``embed_images``) turns an image into its rows. Under M-RoPE (Qwen2-VL) rows inside the
prompt take its M-RoPE positions [3, T] from the batch, so a step that reaches into a prompt needs it. A row after
the prompt sits at ``position + mrope_delta`` in all three components, which is plain rotary at that position: a
step whose M-RoPE rows all lie past their prompts (every decode step) needs no batch, only a per-request offset
(:meth:`MultimodalState.rope_offsets`, ``ForwardBatch.rope_offset``), and so replays CUDA graphs like text. A
model with plain positions (LLaVA: ``mrope_positions`` of shape [3, 0]) needs the batch only for steps whose rows
reach into an image, and its other steps (all its decode steps) run as text.

A model whose image tokens attend to each other in both directions (``bidirectional_images``: Gemma 3) also gets
``image_spans``: per request of the step, the ``[start, end)`` positions of the images its rows reach, for the
attention backend's mask (``attention.base``). Each image must then be computed within one step (see
``multimodal.config.check_engine_args``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch

from sgl_ray.multimodal.inputs import ImageItem, MultimodalInputs
from sgl_ray.scheduler.plan import StepPlan
from sgl_ray.transfer import to_device


class MultimodalBatch(NamedTuple):
    mrope_positions: torch.Tensor | None  # [3, T]; None when no request of the step uses M-RoPE
    image_rows: torch.Tensor | None  # [M] rows of the step whose embedding comes from an image
    image_embeds: torch.Tensor | None  # [M, hidden]
    # per request of the step: [K, 2] positions [start, end) of the images its rows reach (None: none), for models
    # that attend bidirectionally within an image; None for the others
    image_spans: tuple[np.ndarray | None, ...] | None = None


class EmbeddingCache:
    """Image hash -> token embeddings [tokens, hidden], least recently used dropped past ``max_tokens``."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._tokens = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: int) -> torch.Tensor | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return found

    def put(self, key: int, embeds: torch.Tensor) -> None:
        self.misses += 1
        self._entries[key] = embeds
        self._tokens += embeds.shape[0]
        while self._tokens > self.max_tokens and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self._tokens -= dropped.shape[0]


class MultimodalState:
    """Example (inside ``ModelRunner``)::

    >>> state = MultimodalState(model, device)  # doctest: +SKIP
    >>> state.admit(plan)  # doctest: +SKIP
    >>> batch.multimodal = state.step(plan)  # doctest: +SKIP
    >>> offsets = state.rope_offsets(plan)  # [B] or None: steps without a batch  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, cache_tokens: int = 1 << 16) -> None:
        self.model = model
        self.device = device
        self.requests: dict[int, MultimodalInputs] = {}
        self.cache = EmbeddingCache(cache_tokens)
        self.bidirectional = bool(getattr(model, "bidirectional_images", False))
        # Set to a list to record (start, end) CUDA events around every vision-tower call (``bench vision``).
        self.tower_trace: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None

    def admit(self, plan: StepPlan) -> None:
        for idx in plan.freed_req_pool_idxs:
            self.requests.pop(idx, None)
        for new in plan.new_requests:
            if new.multimodal is None:
                self.requests.pop(new.req_pool_idx, None)
            else:
                self.requests[new.req_pool_idx] = new.multimodal.owned()  # kept: copied out of the plan

    def involves(self, plan: StepPlan) -> bool:
        """Whether the step needs a :class:`MultimodalBatch`: rows of an M-RoPE request of it lie inside its
        prompt, or rows of it fall inside an image (which, under M-RoPE, lies inside the prompt)."""
        if not self.requests:
            return False
        for idx, prefix in zip(plan.req_pool_idxs, plan.prefix_lens, strict=True):
            mm = self.requests.get(int(idx))
            if mm is not None and prefix < max(mm.mrope_positions.shape[1], images_end(mm)):
                return True
        return False

    def rope_offsets(self, plan: StepPlan) -> np.ndarray | None:
        """For a step that does not :meth:`involve <involves>` images: [B] int64 what each request adds to its
        rows' positions for the rotary — an M-RoPE request's ``mrope_delta`` (its rows all lie past its prompt),
        0 for the others; None when every offset is 0."""
        if not self.requests:
            return None
        offsets = None
        for r, idx in enumerate(plan.req_pool_idxs):
            mm = self.requests.get(int(idx))
            if mm is not None and mm.mrope_delta and uses_mrope(mm):
                if offsets is None:
                    offsets = np.zeros(len(plan.req_pool_idxs), dtype=np.int64)
                offsets[r] = mm.mrope_delta
        return offsets

    def step(self, plan: StepPlan) -> MultimodalBatch | None:
        if not self.involves(plan):
            return None
        ext, prefix = plan.extend_lens, plan.prefix_lens
        starts = np.cumsum(ext) - ext
        mrope = None
        if any(uses_mrope(mm) for i in plan.req_pool_idxs if (mm := self.requests.get(int(i))) is not None):
            positions = np.repeat(prefix - starts, ext) + np.arange(plan.num_tokens)  # [T] sequence positions
            mrope = np.repeat(positions[None], 3, axis=0)  # [3, T]
        rows: list[np.ndarray] = []
        embeds: list[torch.Tensor] = []
        spans: list[np.ndarray | None] = [None] * len(ext)
        for r, (idx, p0, n, s) in enumerate(zip(plan.req_pool_idxs, prefix, ext, starts, strict=True)):
            mm = self.requests.get(int(idx))
            if mm is None:
                continue
            p1, length = int(p0 + n), mm.mrope_positions.shape[1]
            if mrope is not None and uses_mrope(mm):
                seg = mrope[:, s : s + n]
                if p0 < length:
                    seg[:, : min(p1, length) - p0] = mm.mrope_positions[:, p0 : min(p1, length)]
                if p1 > length:
                    seg[:, max(length, p0) - p0 :] += mm.mrope_delta
            for image in mm.images:
                lo, hi = max(int(p0), image.offset), min(p1, image.offset + image.num_tokens)
                if lo < hi:
                    rows.append(np.arange(s + lo - p0, s + hi - p0))
                    embeds.append(self.embeddings(image)[lo - image.offset : hi - image.offset])
                    if self.bidirectional:
                        span = np.array([[image.offset, image.offset + image.num_tokens]])
                        spans[r] = span if spans[r] is None else np.concatenate([spans[r], span])
        mrope_t = None if mrope is None else to_device(np.ascontiguousarray(mrope), self.device)
        if not rows:
            return MultimodalBatch(mrope_t, None, None)
        image_spans = tuple(spans) if self.bidirectional else None
        return MultimodalBatch(
            mrope_t, to_device(np.concatenate(rows), self.device), torch.cat(embeds), image_spans
        )

    def embeddings(self, image: ImageItem) -> torch.Tensor:
        found = self.cache.get(image.hash)
        if found is None:
            pixels = torch.from_numpy(image.pixel_values).to(self.device)
            traced = self.tower_trace is not None and self.device.type == "cuda"
            if traced:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            found = self.model.embed_images(pixels, [image.grid_thw])
            if traced:
                end.record()
                self.tower_trace.append((start, end))  # type: ignore[union-attr]
            if found.shape[0] != image.num_tokens:  # the processor's rule and the model's packing disagree
                raise ValueError(f"an image of {image.num_tokens} tokens embedded as {found.shape[0]} rows")
            self.cache.put(image.hash, found)
        return found


def uses_mrope(mm: MultimodalInputs) -> bool:
    """Whether the prompt's tokens take M-RoPE positions (else plain ones: ``mrope_positions`` is [3, 0])."""
    return mm.mrope_positions.shape[1] > 0


def images_end(mm: MultimodalInputs) -> int:
    """The position after the prompt's last image token."""
    return max((image.offset + image.num_tokens for image in mm.images), default=0)
