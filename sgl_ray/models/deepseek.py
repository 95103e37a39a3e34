"""DeepSeek-V2 / V2-Lite / V3 (and Kimi-K2, a V3): MLA attention (:mod:`sgl_ray.models.deepseek_attention`) and
DeepSeek's MoE on the shared MoE block.

The first ``first_k_dense_replace`` layers (and those off ``moe_layer_freq``) keep a dense MLP; the others route
over ``n_routed_experts`` with ``n_shared_experts`` always-on experts beside them. Routing follows the class, as in
transformers: V2 takes the softmax of the router's logits, top-k over all experts (``topk_method="greedy"``,
V2-Lite) or over the best ``topk_group`` of ``n_group`` groups by their best expert (``group_limited_greedy``, V2);
V3 takes sigmoid scores, chooses with ``e_score_correction_bias`` added, groups by the sum of their best two, and
renormalizes (``norm_topk_prob``). Both scale the weights by ``routed_scaling_factor``.

Multi-token-prediction layers (``num_nextn_predict_layers``, stored after the last decoder layer as
``model.layers.{num_hidden_layers + i}.*``) are not part of this model: their tensors are skipped at load, and the
layers a checkpoint holds are recorded in :attr:`DeepseekV2ForCausalLM.mtp_layers`. Speculative decoding loads the
first one as a drafter of its own (:mod:`sgl_ray.models.deepseek_mtp`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import Communicator, ShardContext
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.moe.layer import MoEConfig, SparseMoeBlock
from sgl_ray.layers.moe.router import RouterConfig
from sgl_ray.layers.norm import RMSNorm
from sgl_ray.models.deepseek_attention import DeepseekAttention
from sgl_ray.models.llama import LlamaMLP
from sgl_ray.models.llama_attention import CosSin, DecoderFlags
from sgl_ray.models.moe import MoeForCausalLM
from sgl_ray.runner.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekDecoderLayer(nn.Module):
    """Pre-norm residual layer, :class:`~sgl_ray.models.llama.LlamaDecoderLayer`'s constructor and
    ``(hidden, residual)`` protocol, with MLA attention."""

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
        self.self_attn = DeepseekAttention(config, layer_id, tp, flags.rotary_interleaved)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, cos_sin: CosSin, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(hidden), hidden
        else:
            x, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(cos_sin, x, batch)
        return self.mlp.forward_normed(self.post_attention_layernorm, hidden, residual, batch)

    def runs_folded(self, x: torch.Tensor, batch: ForwardBatch) -> bool:
        return False  # the folded one-row step is Llama's layer


class DeepseekV2ForCausalLM(MoeForCausalLM):
    """Example::

    >>> model = DeepseekV2ForCausalLM(ModelConfig(hf_config, torch.bfloat16))  # doctest: +SKIP
    >>> model.load_weights(iter_weights(source))  # doctest: +SKIP
    >>> model.mtp_layers  # doctest: +SKIP
    set()
    """

    decoder_layer = DeepseekDecoderLayer
    checkpoint_renames = ((".self_attn.kv_b_proj.", ".self_attn.attn.kv_b_proj."),)
    # The absorbed decode splits kv_b_proj into W_UK and W_UV: a quantized checkpoint's stays dense (dequantized).
    float_layers = ("kv_b_proj",)

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        hf = config.hf_config
        if config.rotary_dim != hf.qk_rope_head_dim:  # the model's rotary is built for config.head_dim
            raise UnsupportedModelError(
                f"DeepSeek config with head_dim {config.head_dim} != qk_rope_head_dim {hf.qk_rope_head_dim}"
            )
        super().__init__(config, shard, DecoderFlags(rotary_interleaved=self.rotary_interleaved(hf)))
        q_a = (("qkv_a_proj", "q_a_proj", 0), ("qkv_a_proj", "kv_a_proj_with_mqa", 1))
        self.stacked_params = (q_a if hf.q_lora_rank else ()) + (
            ("gate_up_proj", "gate_proj", 0),
            ("gate_up_proj", "up_proj", 1),
        )
        self.mtp_layers: set[int] = set()  # multi-token-prediction layers the checkpoint holds (skipped)

    @staticmethod
    def rotary_interleaved(hf_config) -> bool:
        """V2 rotates pairs ``(2i, 2i + 1)`` (a complex product); V3 too unless ``rope_interleave`` is off."""
        return True

    def router_config(self) -> RouterConfig:
        hf = self.config.hf_config
        method = getattr(hf, "topk_method", None) or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(
                f"DeepSeek-V2 topk_method {method!r} (have: greedy, group_limited_greedy)"
            )
        grouped = method == "group_limited_greedy"
        return RouterConfig(
            int(hf.n_routed_experts),
            int(hf.num_experts_per_tok),
            renormalize=bool(getattr(hf, "norm_topk_prob", False)),
            num_expert_group=hf.n_group if grouped else None,
            topk_group=hf.topk_group if grouped else None,
            routed_scaling_factor=float(hf.routed_scaling_factor),
        )

    def moe_config(self) -> MoEConfig:
        hf = self.config.hf_config
        inter = int(hf.moe_intermediate_size)
        return MoEConfig(
            self.router_config(), inter, shared_intermediate_size=int(hf.n_shared_experts or 0) * inter
        )

    def make_mlp(self, layer: int) -> nn.Module:
        hf = self.config.hf_config
        sparse = (
            bool(getattr(hf, "n_routed_experts", 0))
            and layer >= int(getattr(hf, "first_k_dense_replace", 0) or 0)
            and layer % int(getattr(hf, "moe_layer_freq", 1) or 1) == 0
        )
        if sparse:
            return SparseMoeBlock(self.config.hidden_size, self.moe_config(), self.shard)
        return LlamaMLP(self.config, self.shard.tp)

    def fold_norm_weights(self) -> None:
        """Nothing: folded norm scales pay only in Llama's one-row step, which MLA layers do not take."""

    def _mtp_layer(self, name: str) -> int | None:
        """The index of the multi-token-prediction layer a checkpoint tensor belongs to, else None."""
        m = _LAYER.match(name)
        return int(m.group(1)) if m is not None and int(m.group(1)) >= self.config.num_layers else None

    def wants_weight(self, name: str) -> bool:
        if (mtp := self._mtp_layer(name)) is not None:
            self.mtp_layers.add(mtp)
            return False
        return super().wants_weight(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def decoder_only() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if (mtp := self._mtp_layer(name)) is not None:
                    self.mtp_layers.add(mtp)
                else:
                    yield name, tensor

        super().load_weights(decoder_only())
        if self.mtp_layers:
            logger.info(
                "skipped the multi-token-prediction layer(s) %s of the checkpoint (num_nextn_predict_layers=%s)",
                sorted(self.mtp_layers),
                getattr(self.config.hf_config, "num_nextn_predict_layers", None),
            )


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    @staticmethod
    def rotary_interleaved(hf_config) -> bool:
        return bool(getattr(hf_config, "rope_interleave", True))

    def router_config(self) -> RouterConfig:
        hf = self.config.hf_config
        grouped = hf.n_group is not None and hf.topk_group is not None
        return RouterConfig(
            int(hf.n_routed_experts),
            int(hf.num_experts_per_tok),
            scoring="sigmoid",
            renormalize=bool(hf.norm_topk_prob),
            num_expert_group=hf.n_group if grouped else None,
            topk_group=hf.topk_group if grouped else None,
            group_score="top2_sum",
            routed_scaling_factor=float(hf.routed_scaling_factor),
            correction_bias=True,
        )
