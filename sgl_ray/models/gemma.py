"""Gemma 2 and Gemma 3 text models (``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``): GLM-4's sandwich layer (a norm
before and after attention and the MLP) with Gemma's quirks as flags and config values —

* RMSNorm scales ``1 + weight``, applied in float32 (``DecoderFlags.unit_offset_norms``, ``GemmaRMSNorm``);
* a GELU-tanh gated MLP (``hidden_activation``), embeddings times ``sqrt(hidden_size)`` in the model's dtype
  (``ModelConfig.embedding_multiplier``), tied embeddings;
* the softmax scale ``query_pre_attn_scalar ** -0.5``; local (sliding-window) and global layers by ``layer_types``
  (``ModelConfig.sliding_window_of``), Gemma 3's local layers rotating with their own base
  (``rope_local_base_freq``) and its global ones with ``rope_theta`` and the rope scaling
  (``ModelConfig.rope_parameters_of``);
* tanh soft-capping of the final logits (``final_logit_softcapping``) and, in Gemma 2, of the attention scores
  (``attn_logit_softcapping``, ``RadixAttention.logit_cap``); Gemma 3 adds per-head q/k norms and, as transformers
  does, ignores ``attn_logit_softcapping``.
"""

from __future__ import annotations

import torch

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.models.decoder_variants import VariantForCausalLM
from sgl_ray.models.llama_attention import DecoderFlags


class Gemma2ForCausalLM(VariantForCausalLM):
    checkpoint_renames = (  # applied in order: HF's post_attention_layernorm is the one on attention's output
        (".post_attention_layernorm.", ".post_self_attn_layernorm."),
        (".pre_feedforward_layernorm.", ".post_attention_layernorm."),
        (".post_feedforward_layernorm.", ".post_mlp_layernorm."),
    )
    qk_norm = "none"
    caps_attention = True  # attn_logit_softcapping (Gemma 2 only)

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        hf = config.hf_config
        if getattr(hf, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                "Gemma with use_bidirectional_attention (an encoder) is not supported"
            )
        bias = bool(getattr(hf, "attention_bias", False))
        attn_cap = getattr(hf, "attn_logit_softcapping", None) if self.caps_attention else None
        flags = DecoderFlags(
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=self.qk_norm,
            attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
            attn_logit_cap=attn_cap,
            norms="sandwich",
            unit_offset_norms=True,
        )
        super().__init__(config, shard, flags)
        self.final_logit_cap: float | None = getattr(hf, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        assert self.lm_head is not None, "logits are computed on the last pipeline stage"
        logits = self.lm_head(hidden)
        cap = self.final_logit_cap
        if cap is not None:  # in the model's dtype, as transformers caps them
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = "head"
    caps_attention = False
