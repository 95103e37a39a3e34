"""The MLA layer a model's attention block calls: it owns ``kv_b_proj`` (latent -> per-head K/V), applies it in both
directions the backends need, and hands the step to the batch's MLA backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sgl_ray.distributed import Communicator, SingleProcessCommunicator
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.linear import ColumnParallelLinear
from sgl_ray.layers.quantization import QuantizedWeight

if TYPE_CHECKING:
    from sgl_ray.runner.forward_batch import ForwardBatch


class LatentAttention(nn.Module):
    """Multi-head latent attention of layer ``layer_id`` (its index in this stage's pool). ``num_heads`` is the
    model's; a tensor-parallel rank holds ``num_heads / tp`` of them (its rows of ``kv_b_proj``) and the whole
    latent, which every rank stores.

    Example::

        >>> attn = LatentAttention(16, 128, 64, 128, 512, scaling=192**-0.5, layer_id=0)
        >>> attn.kv_b_proj.weight.shape  # [H * (nope + v), kv_lora_rank]
        torch.Size([4096, 512])
    """

    def __init__(
        self,
        num_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        kv_lora_rank: int,
        scaling: float,
        layer_id: int,
        tp: Communicator | None = None,
    ) -> None:
        super().__init__()
        tp = tp or SingleProcessCommunicator()
        self.kv_b_proj = ColumnParallelLinear(
            kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), False, tp
        )
        self.num_heads = num_heads // tp.world_size
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.scaling = scaling
        self.layer_id = layer_id

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    def _up(self) -> torch.Tensor:
        """``kv_b_proj``'s weight per head: [H, nope + v, C] (a view: rows ``[0, nope)`` are W_UK, the rest W_UV)."""
        w = self.kv_b_proj.weight
        if isinstance(w, QuantizedWeight):
            raise UnsupportedModelError("MLA needs kv_b_proj in float weights (it is applied absorbed)")
        return w.unflatten(0, (self.num_heads, -1))

    def absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
        """``q_nope`` [T, H, nope] -> ``W_UK^T q_nope`` [T, H, C] (a strided view): the query against latents."""
        w_uk = self._up()[:, : self.qk_nope_head_dim]  # [H, nope, C]
        return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)

    def project_out(self, o_latent: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space [T, H, C] -> ``W_UV o`` [T, H, v] (a strided view)."""
        w_uv = self._up()[:, self.qk_nope_head_dim :]  # [H, v, C]
        return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def expand(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``c`` [S, C] -> this rank's per-head ``k_nope`` [S, H, nope] and ``v`` [S, H, v]."""
        kv = self.kv_b_proj(c).view(c.shape[0], self.num_heads, -1)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        return k_nope, v

    def forward(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """``q_nope`` [T, H, nope], rotated ``q_pe`` [T, H, R], ``latent`` [T, C + R] -> [T, H * v] (see
        ``MLAAttentionBackend.forward_mla``, which the runner's backend implements for MLA models)."""
        out = batch.attn_backend.forward_mla(q_nope, q_pe, latent, self, batch)
        return out.reshape(out.shape[0], self.num_heads * self.v_head_dim)
