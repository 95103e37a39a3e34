"""The attention block of a Llama-style decoder layer, shared by every family (Llama, Qwen, the MoE families):
the QKV projection, the family's q/k treatment (:class:`DecoderFlags`), rotary, paged attention and the output
projection, with the fused CUDA paths of :mod:`sgl_ray.layers.fused_linear` where they apply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import Communicator
from sgl_ray.layers.attention import RadixAttention
from sgl_ray.layers.cuda_ops import cuda_ops
from sgl_ray.layers.fused_linear import fuses_rotary_store
from sgl_ray.layers.linear import QKVParallelLinear, RowParallelLinear
from sgl_ray.layers.norm import GemmaRMSNorm, RMSNorm
from sgl_ray.layers.rotary import RotaryEmbedding
from sgl_ray.runner.forward_batch import ForwardBatch

CosSin = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DecoderFlags:
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"  # RMSNorm of q and k per head (Qwen3) or whole (OLMoE)
    clip_qkv: float | None = None  # clamp q, k, v to [-c, c] after the projection (OLMoE)
    sinks: bool = False  # a learned attention-sink logit per head (GPT-OSS)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5 (Granite: attention_multiplier)
    rotary_interleaved: bool = False  # rotary on pairs (2i, 2i + 1) instead of halves (GLM)
    attn_logit_cap: float | None = None  # attention scores soft-capped to cap * tanh(s / cap) (Gemma 2)
    unit_offset_norms: bool = False  # every RMSNorm scales by 1 + weight, in float32 (Gemma: GemmaRMSNorm)
    # The layer's shape beyond Llama's (models.decoder_variants.VariantDecoderLayer): where its RMSNorms sit —
    # before each block (Llama), after it on the block's output (OLMo 2) or both (GLM-4) — and a scale of the
    # blocks' outputs before the residual add (Granite).
    norms: Literal["pre", "post", "sandwich"] = "pre"
    residual_multiplier: float = 1.0

    @property
    def llama_layer(self) -> bool:
        """Whether ``LlamaDecoderLayer`` (and its fused CUDA paths) implements the layer."""
        return self.norms == "pre" and self.residual_multiplier == 1.0 and not self.unit_offset_norms

    def rms_norm(self, size: int, eps: float) -> RMSNorm:
        """An RMSNorm of the family: Llama's, or Gemma's with ``unit_offset_norms``."""
        return GemmaRMSNorm(size, eps) if self.unit_offset_norms else RMSNorm(size, eps)

    @classmethod
    def for_llama(cls, config: ModelConfig) -> DecoderFlags:
        bias = bool(getattr(config.hf_config, "attention_bias", False))
        return cls(qkv_bias=bias, o_bias=bias)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        flags: DecoderFlags,
        tp: Communicator,
        global_layer_id: int | None = None,
    ) -> None:
        """``layer_id``: the layer's index in this stage's KV pool; ``global_layer_id``: in the model."""
        super().__init__()
        global_layer_id = layer_id if global_layer_id is None else global_layer_id
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads, flags.qkv_bias, tp
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, flags.o_bias, tp
        )
        self.tp = tp
        self.qk_norm = flags.qk_norm
        self.clip_qkv = flags.clip_qkv
        self.rotary_interleaved = flags.rotary_interleaved
        # The fused CUDA rotary kernels rotate whole heads by halves (NeoX).
        self.neox_rotary = config.rotary_dim == config.head_dim and not flags.rotary_interleaved
        q_width, k_width = config.head_dim, config.head_dim
        if (
            flags.qk_norm == "full"
        ):  # over the whole projection of all ranks (gathered under tensor parallelism)
            q_width, k_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        has_norm = flags.qk_norm != "none"
        self.q_norm = flags.rms_norm(q_width, config.rms_norm_eps) if has_norm else None
        self.k_norm = flags.rms_norm(k_width, config.rms_norm_eps) if has_norm else None
        self.unit_offset_norms = flags.unit_offset_norms
        # one per q and k head of this rank, for the QKV GEMV that norms them itself (triton_gemv_epilogues)
        heads = self.qkv_proj.num_heads + self.qkv_proj.num_kv_heads
        counters = torch.zeros(heads, dtype=torch.int32) if flags.qk_norm == "head" else None
        self.register_buffer("head_counters", counters, persistent=False)
        qkv = self.qkv_proj
        self.attn = RadixAttention(
            qkv.num_heads,
            qkv.head_dim,
            config.head_dim**-0.5 if flags.attn_scale is None else flags.attn_scale,
            qkv.num_kv_heads,
            layer_id,
            sliding_window=config.sliding_window_of(global_layer_id),
            sinks=flags.sinks,
            tp_rank=tp.rank,
            logit_cap=flags.attn_logit_cap,
        )

    @property
    def plain(self) -> bool:
        """No op between the QKV projection and rotary (no q/k norm, no clipping) and a NeoX rotary of whole
        heads: the fused paths apply."""
        return self.q_norm is None and self.clip_qkv is None and self.neox_rotary

    @property
    def folds_input_norm(self) -> bool:
        """Whether a one-row step can take the norm before this block inside the QKV GEMV (folded norms, see
        ``LlamaDecoderLayer.forward_folded``): plain, or per-head q/k norms without clipping (Qwen3; not Gemma's,
        whose scale the fused kernels do not apply)."""
        return self.plain or (
            self.qk_norm == "head"
            and self.clip_qkv is None
            and self.neox_rotary
            and not self.unit_offset_norms
        )

    def fuses_rotary_store(self, x: torch.Tensor, batch: ForwardBatch) -> bool:
        """Whether the QKV projection of ``x`` can rotate q and k and store k and v itself (one CUDA row)."""
        return (
            self.folds_input_norm and batch.kv_pool.dtype == x.dtype and fuses_rotary_store(self.qkv_proj, x)
        )

    def store_args(self, cos_sin: CosSin, batch: ForwardBatch) -> object:
        """The ``triton_ops.RotaryStore`` of this layer's step: rotary, the KV-pool store and, with per-head q/k
        norms, those norms (``triton_ops.rotary_store`` takes the same after qkv)."""
        k_cache, v_cache = batch.kv_pool.get_kv(self.attn.layer_id)
        p = self.qkv_proj
        store = cuda_ops().RotaryStore(
            *cos_sin, batch.store_loc(self.attn), k_cache, v_cache, p.num_heads, p.num_kv_heads
        )
        if self.q_norm is None:
            return store
        assert self.k_norm is not None and self.qk_norm == "head"
        return store._replace(
            q_norm=self.q_norm.weight,
            k_norm=self.k_norm.weight,
            norm_eps=self.q_norm.eps,
            counters=self.head_counters,
        )

    def attend_stored(self, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Attention of the rotated q in ``qkv`` over the pool, which holds this step's k and v already."""
        p = self.qkv_proj
        q, k = qkv[:, : p.q_size], qkv[:, p.q_size : p.q_size + p.kv_size]
        return self.attn(q, k, qkv[:, p.q_size + p.kv_size :], batch, kv_stored=True)

    def rotate_store_attend(self, cos_sin: CosSin, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """On CUDA, where :attr:`folds_input_norm`: (per-head q/k norms,) rotary on q and k and the KV-pool store
        of k and v in one kernel, then attention; returns the attention output before ``o_proj``."""
        p, store = self.qkv_proj, self.store_args(cos_sin, batch)
        q, k = cuda_ops().rotary_store(
            qkv, *store[:7], q_norm=store.q_norm, k_norm=store.k_norm, eps=store.norm_eps
        )
        t, v = qkv.shape[0], qkv[:, p.q_size + p.kv_size :]
        return self.attn(q.view(t, -1), k.view(t, -1), v, batch, kv_stored=True)

    def _norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's q [T, H * D] and k [T, KVH * D] -> normed, as [T, H, D] and [T, KVH, D]."""
        assert self.q_norm is not None and self.k_norm is not None
        t, d = q.shape[0], self.qkv_proj.head_dim
        if self.qk_norm == "head":
            q, k = self.q_norm(q.reshape(t, -1, d)), self.k_norm(k.reshape(t, -1, d))
        elif self.tp.world_size == 1:
            q, k = self.q_norm(q).view(t, -1, d), self.k_norm(k).view(t, -1, d)
        else:
            q, k = self._norm_whole_qk(q, k)
        if self.clip_qkv is not None:
            q, k = q.clamp(-self.clip_qkv, self.clip_qkv), k.clamp(-self.clip_qkv, self.clip_qkv)
        return q, k

    def _norm_whole_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.q_norm is not None and self.k_norm is not None
        t, d = q.shape[0], self.qkv_proj.head_dim
        # Whole-projection norms under tensor parallelism: gather every rank's slice (KV heads replicated on
        # ``kv_replicas`` consecutive ranks are taken once), norm, and keep this rank's slice.
        rank, replicas = self.tp.rank, self.qkv_proj.kv_replicas
        q_full = self.tp.all_gather(q.contiguous(), dim=-1)
        k_parts = self.tp.all_gather(k.contiguous(), dim=-1).split(k.shape[1], dim=-1)
        k_full = torch.cat(k_parts[::replicas], dim=-1)
        q = self.q_norm(q_full).split(q.shape[1], dim=-1)[rank]
        k = self.k_norm(k_full).split(k.shape[1], dim=-1)[rank // replicas]
        return q.reshape(t, -1, d), k.reshape(t, -1, d)

    def forward(
        self, cos_sin: CosSin, qkv: torch.Tensor, batch: ForwardBatch, rotated_and_stored: bool = False
    ) -> torch.Tensor:
        """From the output of ``qkv_proj``, which the decoder layer runs (see ``fused_linear.norm_linear``):
        ``[T, (H + 2 * KVH) * D]`` -> the output of ``o_proj``. ``rotated_and_stored``: q and k in ``qkv`` are
        rotated and k and v are in the pool (``fused_linear.norm_qkv_rotary_store``)."""
        p = self.qkv_proj
        t, d = qkv.shape[0], p.head_dim
        if rotated_and_stored:
            return self.o_proj(self.attend_stored(qkv, batch))
        if self.folds_input_norm and qkv.is_cuda and batch.kv_pool.dtype == qkv.dtype:
            return self.o_proj(self.rotate_store_attend(cos_sin, qkv, batch))
        if self.q_norm is None:  # rotate q and k (adjacent in qkv) in one pass
            qk = qkv[:, : p.q_size + p.kv_size].view(t, -1, d)
            if self.clip_qkv is not None:
                qk = qk.clamp(-self.clip_qkv, self.clip_qkv)
            qk = RotaryEmbedding.apply(qk, cos_sin, self.rotary_interleaved)  # [T, H + KVH, D]
            q, k = qk[:, : p.num_heads], qk[:, p.num_heads :]
        else:
            q, k = self._norm_qk(qkv[:, : p.q_size], qkv[:, p.q_size : p.q_size + p.kv_size])
            interleaved = self.rotary_interleaved
            q = RotaryEmbedding.apply(q, cos_sin, interleaved)
            k = RotaryEmbedding.apply(k, cos_sin, interleaved)
        v = qkv[:, p.q_size + p.kv_size :]
        if self.clip_qkv is not None:  # after the q/k norms (OLMoE)
            v = v.clamp(-self.clip_qkv, self.clip_qkv)
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v, batch)
        return self.o_proj(out)
