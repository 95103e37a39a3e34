"""Decoder layers shaped unlike Llama's: RMSNorms on the blocks' outputs (OLMo 2: after each block instead of
before it; GLM-4, Gemma 2/3: both) or the blocks' outputs scaled before the residual add (Granite).

:class:`DecoderFlags` says which (``norms``, ``residual_multiplier``); the attention and the MLP are Llama's. The
fused CUDA steps of :class:`~sgl_ray.models.llama.LlamaDecoderLayer` assume its shape (folded norm scales, the
residual added inside the projections), so these layers take the separate modules on every step and their models
never fold norms.

The norms are named by where they sit; a family whose checkpoint names them otherwise renames them
(:attr:`VariantForCausalLM.checkpoint_renames`)::

    input_layernorm           before attention        (Llama, Granite, GLM-4, Gemma)
    post_self_attn_layernorm  on attention's output   (OLMo 2, GLM-4, Gemma)
    post_attention_layernorm  before the MLP          (Llama, Granite, GLM-4, Gemma's pre_feedforward_layernorm)
    post_mlp_layernorm        on the MLP's output     (OLMo 2, GLM-4, Gemma's post_feedforward_layernorm)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import Communicator
from sgl_ray.layers.fused_linear import norm_linear
from sgl_ray.layers.norm import RMSNorm
from sgl_ray.models.llama import LlamaForCausalLM, LlamaMLP
from sgl_ray.models.llama_attention import CosSin, DecoderFlags, LlamaAttention
from sgl_ray.runner.forward_batch import ForwardBatch


class VariantDecoderLayer(nn.Module):
    """A layer with :class:`LlamaDecoderLayer`'s constructor and ``(hidden, residual)`` protocol: the residual
    stream is ``hidden + residual`` (``hidden`` alone before the first layer), added by the next norm."""

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        flags: DecoderFlags,
        tp: Communicator,
        mlp: nn.Module | None = None,
        global_layer_id: int | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, flags, tp, global_layer_id)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, tp)
        pre, post = flags.norms in ("pre", "sandwich"), flags.norms in ("post", "sandwich")

        def norm(present: bool) -> RMSNorm | None:
            return flags.rms_norm(config.hidden_size, config.rms_norm_eps) if present else None

        self.input_layernorm = norm(pre)
        self.post_self_attn_layernorm = norm(post)
        self.post_attention_layernorm = norm(pre)
        self.post_mlp_layernorm = norm(post)
        self.residual_multiplier = flags.residual_multiplier

    def _block_output(self, out: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
        """What a block adds to the residual stream: its output, normed (post-norms), scaled (Granite)."""
        if norm is not None:
            out = norm(out)
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier

    def forward(
        self, cos_sin: CosSin, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.self_attn
        if self.input_layernorm is not None:
            qkv, residual = norm_linear(self.input_layernorm, attn.qkv_proj, hidden, residual)
        else:
            residual = hidden if residual is None else residual + hidden
            qkv = attn.qkv_proj(residual)
        hidden = self._block_output(attn(cos_sin, qkv, batch), self.post_self_attn_layernorm)
        if self.post_attention_layernorm is not None:
            hidden, residual = self.mlp.forward_normed(self.post_attention_layernorm, hidden, residual, batch)
        else:
            residual = residual + hidden
            hidden = self.mlp(residual)
        return self._block_output(hidden, self.post_mlp_layernorm), residual

    def runs_folded(self, x: torch.Tensor, batch: ForwardBatch) -> bool:
        return False  # the folded step is Llama's layer


class VariantForCausalLM(LlamaForCausalLM):
    """The base of the families built on :class:`VariantDecoderLayer`; subclasses pass their flags and set
    :attr:`checkpoint_renames`."""

    decoder_layer = VariantDecoderLayer
    checkpoint_renames: tuple[tuple[str, str], ...] = ()  # (checkpoint substring, ours), applied in order

    def fold_norm_weights(self) -> None:
        """Nothing: folded norm scales pay only in Llama's folded one-row step, which these layers never take."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                for theirs, ours in self.checkpoint_renames:
                    name = name.replace(theirs, ours)
                yield name, tensor

        super().load_weights(renamed())
