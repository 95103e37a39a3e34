"""The tensors one forward pass reads: built by the runner from a step plan, consumed by model and attention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from sgl_ray.attention.base import AttentionBackend, TreeMask
    from sgl_ray.layers.moe.base import MoEBackend
    from sgl_ray.mem_cache.kv_pool import KVPool


@dataclass
class ForwardBatch:
    """B requests, T new tokens in total, laid out request by request.

    ::

        tokens:  | req 0: extend_lens[0] | req 1: extend_lens[1] | ... |
                 ^ extend_start_loc[0]   ^ extend_start_loc[1]
        request r's new token i sits at position prefix_lens[r] + i of its sequence.
    """

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_cache_loc: torch.Tensor  # [T] KV slot each new token is written to
    req_pool_idxs: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B] prefix + extend
    extend_start_loc: torch.Tensor  # [B]
    logits_indices: torch.Tensor  # [N] token rows whose logits are needed
    prefix_lens_cpu: np.ndarray  # [B]
    extend_lens_cpu: np.ndarray  # [B]
    kv_pool: KVPool
    req_to_token: torch.Tensor  # [max_reqs, max_context]
    attn_backend: AttentionBackend
    attn_metadata: Any = None
    moe_backend: MoEBackend | None = None  # set for models with MoE layers
    # EAGLE-3: the model appends the residual stream at the input of its ``capture_layers`` here ([T, hidden] each)
    captured_hidden: list[torch.Tensor] | None = None
    multimodal: Any = None  # multimodal.runner.MultimodalBatch of a step with image requests (VL models)
    # M-RoPE models, steps without ``multimodal``: [T] added to ``positions`` for the rotary only (a generated token
    # of an image request rotates at position + mrope_delta); never read for KV slots or sequence lengths
    rope_offset: torch.Tensor | None = None
    # Hybrid KV pools (mem_cache.hybrid_swa): the full pool's slot -> the windowed layers' slot ([num_slots], the
    # runner's persistent map, updated in place), and the new tokens' slots in the windowed layers' pool
    full_to_swa: torch.Tensor | None = None
    swa_out_cache_loc: torch.Tensor | None = None  # [T], set by ``translate_swa``
    tree_mask: TreeMask | None = None  # speculative tree verification (attention.base.TreeMask)
    # (``swa_req_to_token``, ``swa_req_pool_idxs``), built on first read
    _swa_table: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def translate_swa(self) -> None:
        """Hybrid pools: the new tokens' slots in the windowed layers' pool (call once per step, before the
        attention metadata). A fixed shape ([T]) and no host value: a CUDA graph captures it, and each replay reads
        the map as it is then."""
        if self.full_to_swa is not None:
            self.swa_out_cache_loc = self.full_to_swa[self.out_cache_loc]

    @property
    def swa_req_to_token(self) -> torch.Tensor | None:
        """Hybrid pools: [B, longest sequence] the batch's table rows translated to the windowed layers' slots, for
        backends that read the table as it is (torch). Built on first read: a gather of every request's row, which
        the Triton kernels avoid by reading the table through ``full_to_swa`` themselves (``slot_map``)."""
        if self.full_to_swa is None:
            return None
        if self._swa_table is None:
            assert not (self.full_to_swa.is_cuda and torch.cuda.is_current_stream_capturing()), (
                "the translated table's width is the step's longest sequence: not for a CUDA graph"
            )
            width = int(self.seq_lens_cpu.max()) if self.batch_size else 0
            table = self.full_to_swa[self.req_to_token[self.req_pool_idxs, :width]]
            self._swa_table = table, torch.arange(self.batch_size, device=self.req_pool_idxs.device)
        return self._swa_table[0]

    @property
    def swa_req_pool_idxs(self) -> torch.Tensor | None:
        """[B] arange: row r of ``swa_req_to_token`` is request r."""
        if self.swa_req_to_token is None:
            return None
        assert self._swa_table is not None
        return self._swa_table[1]

    def uses_swa_pool(self, layer: Any) -> bool:
        """Whether ``layer`` (a RadixAttention) stores and reads its KV through the windowed layers' slots."""
        return self.full_to_swa is not None and layer.sliding_window is not None

    def store_loc(self, layer: Any) -> torch.Tensor:
        """[T] the slots ``layer`` stores the new tokens' K/V at, in its own pool."""
        if self.uses_swa_pool(layer):
            assert self.swa_out_cache_loc is not None, "translate_swa() first"
            return self.swa_out_cache_loc
        return self.out_cache_loc

    def slot_map(self, layer: Any) -> torch.Tensor | None:
        """The map from ``req_to_token``'s slots to ``layer``'s pool for kernels that read the table through it
        (None: the table's slots are the layer's own)."""
        return self.full_to_swa if self.uses_swa_pool(layer) else None

    def kv_indices(self, layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out_cache_loc, req_to_token, req_pool_idxs) in ``layer``'s slot space (the table translated)."""
        if self.uses_swa_pool(layer):
            return self.store_loc(layer), self.swa_req_to_token, self.swa_req_pool_idxs  # type: ignore[return-value]
        return self.out_cache_loc, self.req_to_token, self.req_pool_idxs

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_lens_cpu(self) -> np.ndarray:
        return self.prefix_lens_cpu + self.extend_lens_cpu

    @property
    def is_decode(self) -> bool:
        """Every request adds exactly one token."""
        return bool((self.extend_lens_cpu == 1).all())
