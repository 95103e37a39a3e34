"""The runner side of multi-LoRA: adapter slots in every wrapped projection of this shard.

The scheduler decides which adapter lives in which slot (:mod:`sgl_ray.lora.pool`) and tells the runner through
the step plan (``lora_loads``: load this adapter into that slot before the step; ``lora_slots``: each request's
slot). Every shard of a group gets the same plan and loads its own slice of each adapter.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from sgl_ray.lora.adapter import load_adapter_weights, read_adapter_config
from sgl_ray.lora.backend import LoRABatch, create_lora_backend
from sgl_ray.lora.layers import LoRAContext, wrap_model

logger = logging.getLogger(__name__)


class LoRAWeights:
    """Example::

    >>> lora = LoRAWeights(model, num_slots=8, max_rank=16, device=torch.device("cpu"))  # doctest: +SKIP
    >>> lora.load(0, "/adapters/sql")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        num_slots: int,
        max_rank: int,
        device: torch.device,
        backend: str | None = None,
    ) -> None:
        self.device = device
        self.num_slots = num_slots
        self.ctx = LoRAContext(create_lora_backend(backend, device))
        self.layers = wrap_model(model, self.ctx, num_slots, max_rank)
        self.loaded: dict[int, str] = {}  # slot -> adapter path

    def load(self, slot: int, path: str) -> None:
        """Replace whatever is in ``slot`` with the adapter at ``path`` (this shard's slice of it)."""
        t0 = time.perf_counter()
        config = read_adapter_config(path)
        weights = load_adapter_weights(config)
        for modules in self.layers.values():
            for wrapper in set(modules.values()):
                wrapper.clear_slot(slot)
        for (layer, module), (a, b) in weights.items():
            wrapper = self.layers.get(layer, {}).get(module)
            if wrapper is not None:  # layers of other pipeline stages are skipped
                wrapper.load_slot(slot, module, a, b)
        self.loaded[slot] = path
        logger.info("LoRA adapter %s -> slot %d in %.3fs", path, slot, time.perf_counter() - t0)

    def begin(self, slots: np.ndarray, extend_lens: np.ndarray) -> None:
        """Bind this step's requests to their slots (``slots[r] = -1``: base model)."""
        self.ctx.batch = LoRABatch.from_requests(slots, extend_lens, self.device) if len(slots) else None

    def end(self) -> None:
        self.ctx.batch = None
