"""The tensors one forward pass reads: built by the runner from a step plan, consumed by model and attention."""

from __future__ import annotations

from dataclasses import dataclass
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
    # Hybrid KV pools (mem_cache.hybrid_swa): the full pool's slot -> the windowed layers' slot ([num_slots]), and
    # what ``translate_swa`` derives from it once per step for those layers
    full_to_swa: torch.Tensor | None = None
    swa_out_cache_loc: torch.Tensor | None = None  # [T]
    swa_req_to_token: torch.Tensor | None = None  # [B, max seq len] the batch's table rows, translated
    swa_req_pool_idxs: torch.Tensor | None = None  # [B] arange: row r of ``swa_req_to_token`` is request r
    tree_mask: TreeMask | None = None  # speculative tree verification (attention.base.TreeMask)

    def translate_swa(self) -> None:
        """Hybrid pools: the windowed layers' slots of this step (call once, before the attention metadata)."""
        if self.full_to_swa is None:
            return
        width = int(self.seq_lens_cpu.max()) if self.batch_size else 0
        self.swa_out_cache_loc = self.full_to_swa[self.out_cache_loc]
        self.swa_req_to_token = self.full_to_swa[self.req_to_token[self.req_pool_idxs, :width]]
        self.swa_req_pool_idxs = torch.arange(self.batch_size, device=self.req_pool_idxs.device)

    def uses_swa_pool(self, layer: Any) -> bool:
        """Whether ``layer`` (a RadixAttention) stores and reads its KV through the windowed layers' slots."""
        return self.full_to_swa is not None and layer.sliding_window is not None

    def kv_indices(self, layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out_cache_loc, req_to_token, req_pool_idxs) in ``layer``'s slot space."""
        if self.uses_swa_pool(layer):
            assert self.swa_out_cache_loc is not None, "translate_swa() first"
            return self.swa_out_cache_loc, self.swa_req_to_token, self.swa_req_pool_idxs  # type: ignore[return-value]
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
