"""DeepSeek's attention block (MLA): low-rank query, a compressed KV latent with a decoupled rotary key, and the
latent attention of :mod:`sgl_ray.attention.mla`.

::

    x [T, hidden] (normed)
      ├─ q_a_proj ─ q_a_layernorm ─ q_b_proj ─┐  (q_lora_rank; V2-Lite: one q_proj)
      │                                       └▶ q [T, H, nope + R] ─▶ q_nope, rotary(q_pe)
      └─ kv_a_proj_with_mqa ─▶ [c_raw (C) | k_pe (R)] ─▶ latent [T, C + R] = [kv_a_layernorm(c_raw) | rotary(k_pe)]
    LatentAttention(q_nope, q_pe, latent) [T, H * v] ─ o_proj ─▶ [T, hidden]

With a q LoRA, ``q_a_proj`` and ``kv_a_proj_with_mqa`` (both of x, both whole on every tensor-parallel rank) are one
matrix, ``qkv_a_proj``. ``q_b_proj``/``q_proj`` and ``kv_b_proj`` are split by heads, ``o_proj`` by its input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sgl_ray.attention.mla import LatentAttention
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import Communicator
from sgl_ray.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from sgl_ray.layers.norm import RMSNorm
from sgl_ray.layers.rotary import RotaryEmbedding
from sgl_ray.models.llama_attention import CosSin
from sgl_ray.runner.forward_batch import ForwardBatch

LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm keep RMSNorm's default, not rms_norm_eps


def mla_softmax_scale(rope_parameters: dict, qk_head_dim: int) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale**2`` under a scaled rope with ``mscale_all_dim`` (YaRN's
    ``0.1 * mscale_all_dim * ln(factor) + 1``): DeepSeek scales every query-key dimension, not only the rotary
    ones that the rope's attention factor reaches (transformers' ``yarn_apply_mscale``).

    >>> round(mla_softmax_scale({"rope_type": "yarn", "factor": 40, "mscale_all_dim": 0.707}, 192), 6)
    0.114721
    """
    scale = qk_head_dim**-0.5
    mscale_all_dim = rope_parameters.get("mscale_all_dim")
    factor = rope_parameters.get("factor") or 1.0
    if rope_parameters.get("rope_type", "default") != "default" and mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


class DeepseekAttention(nn.Module):
    folds_input_norm = False  # no fused one-row step (see LlamaForCausalLM.fold_norm_weights)

    def __init__(
        self, config: ModelConfig, layer_id: int, tp: Communicator, rotary_interleaved: bool
    ) -> None:
        """``layer_id``: the layer's index in this stage's KV pool; ``rotary_interleaved``: rotary on pairs
        ``(2i, 2i + 1)`` (DeepSeek-V2, V3's ``rope_interleave``) rather than halves."""
        super().__init__()
        hf = config.hf_config
        heads, hidden = config.num_heads, config.hidden_size
        self.nope, self.rope = int(hf.qk_nope_head_dim), int(hf.qk_rope_head_dim)
        self.kv_lora_rank, self.q_lora_rank = int(hf.kv_lora_rank), hf.q_lora_rank
        self.rotary_interleaved = rotary_interleaved
        bias = bool(getattr(hf, "attention_bias", False))
        q_width = heads * (self.nope + self.rope)
        kv_a_width = self.kv_lora_rank + self.rope
        if self.q_lora_rank:
            self.qkv_a_proj = MergedColumnParallelLinear(hidden, [self.q_lora_rank, kv_a_width], bias, None)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, q_width, False, tp)
        else:
            self.q_proj = ColumnParallelLinear(hidden, q_width, False, tp)
            self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, kv_a_width, bias, None)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        v_dim = int(hf.v_head_dim)
        scale = mla_softmax_scale(config.rope_parameters, self.nope + self.rope)
        self.attn = LatentAttention(
            heads, self.nope, self.rope, v_dim, self.kv_lora_rank, scale, layer_id, tp
        )
        self.o_proj = RowParallelLinear(heads * v_dim, hidden, bias, tp)

    def forward(self, cos_sin: CosSin, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """``x`` [T, hidden], the normed input -> the output of ``o_proj`` [T, hidden]."""
        t = x.shape[0]
        if self.q_lora_rank:
            q_a, kv_a = self.qkv_a_proj(x).split([self.q_lora_rank, self.kv_lora_rank + self.rope], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a.contiguous()))
        else:
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        q_nope, q_pe = q.view(t, -1, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        c, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        q_pe = RotaryEmbedding.apply(q_pe, cos_sin, self.rotary_interleaved)  # [T, H, R]
        k_pe = RotaryEmbedding.apply(k_pe.unsqueeze(1), cos_sin, self.rotary_interleaved)  # [T, 1, R]
        latent = torch.cat([self.kv_a_layernorm(c.contiguous()), k_pe.squeeze(1)], dim=-1)  # [T, C + R]
        return self.o_proj(self.attn(q_nope, q_pe, latent, batch))
