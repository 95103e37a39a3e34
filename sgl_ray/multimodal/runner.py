"""The model runner's side of image inputs: each request slot's :class:`MultimodalInputs` (from its
``NewRequest``), an LRU cache of image embeddings keyed by image hash, and the per-step
:class:`MultimodalBatch` that the model reads from ``ForwardBatch.multimodal``.

A step covers positions ``[prefix, prefix + extend)`` of each request. The rows of that range inside an image take
that image's embedding rows (so a prefill chunk may start or end inside an image, and a prefix-cache hit may end
inside one); rows inside the prompt take its M-RoPE positions, rows after it ``position + mrope_delta``.
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
    mrope_positions: torch.Tensor  # [3, T]
    image_rows: torch.Tensor | None  # [M] rows of the step whose embedding comes from an image
    image_embeds: torch.Tensor | None  # [M, hidden]


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
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, cache_tokens: int = 1 << 16) -> None:
        self.model = model
        self.device = device
        self.requests: dict[int, MultimodalInputs] = {}
        self.cache = EmbeddingCache(cache_tokens)

    def admit(self, plan: StepPlan) -> None:
        for idx in plan.freed_req_pool_idxs:
            self.requests.pop(idx, None)
        for new in plan.new_requests:
            if new.multimodal is None:
                self.requests.pop(new.req_pool_idx, None)
            else:
                self.requests[new.req_pool_idx] = new.multimodal.owned()  # kept: copied out of the plan

    def involves(self, plan: StepPlan) -> bool:
        """Whether a request of the step has images (its rows then need M-RoPE positions, not plain ones)."""
        return bool(self.requests) and any(int(i) in self.requests for i in plan.req_pool_idxs)

    def step(self, plan: StepPlan) -> MultimodalBatch | None:
        if not self.involves(plan):
            return None
        ext, prefix = plan.extend_lens, plan.prefix_lens
        starts = np.cumsum(ext) - ext
        positions = np.repeat(prefix - starts, ext) + np.arange(plan.num_tokens)  # [T] sequence positions
        mrope = np.repeat(positions[None], 3, axis=0)  # [3, T]
        rows: list[np.ndarray] = []
        embeds: list[torch.Tensor] = []
        for idx, p0, n, s in zip(plan.req_pool_idxs, prefix, ext, starts, strict=True):
            mm = self.requests.get(int(idx))
            if mm is None:
                continue
            p1, length = int(p0 + n), mm.mrope_positions.shape[1]
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
        mrope_t = to_device(np.ascontiguousarray(mrope), self.device)
        if not rows:
            return MultimodalBatch(mrope_t, None, None)
        return MultimodalBatch(mrope_t, to_device(np.concatenate(rows), self.device), torch.cat(embeds))

    def embeddings(self, image: ImageItem) -> torch.Tensor:
        found = self.cache.get(image.hash)
        if found is None:
            pixels = torch.from_numpy(image.pixel_values).to(self.device)
            found = self.model.embed_images(pixels, [image.grid_thw])
            self.cache.put(image.hash, found)
        return found
