"""Llama-family decoder (Llama 2/3, Mistral, SmolLM2) — also the base of Qwen2/3 and of the MoE families.

Families differ only in flags (:class:`DecoderFlags`: projection biases, q/k RMSNorm per head or over the whole
projection, q/k/v clipping, attention sinks) and in the MLP of each layer (:meth:`LlamaForCausalLM.make_mlp`:
dense here, a ``SparseMoeBlock`` in the MoE families). Per-layer sliding windows come from the HF config
(:meth:`ModelConfig.sliding_window_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import Communicator, ShardContext
from sgl_ray.layers import fused_linear
from sgl_ray.layers.activation import SiluAndMul, gated_activation
from sgl_ray.layers.cuda_ops import cuda_ops
from sgl_ray.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from sgl_ray.layers.fused_linear import (
    norm_linear,
    norm_qkv_rotary_store,
    one_row_gemvs,
    silu_mul_linear,
)
from sgl_ray.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from sgl_ray.layers.norm import RMSNorm
from sgl_ray.layers.rotary import RotaryEmbedding
from sgl_ray.models.llama_attention import CosSin, DecoderFlags, LlamaAttention
from sgl_ray.models.loading import load_stacked_weights
from sgl_ray.runner.forward_batch import ForwardBatch

Intermediate = tuple[torch.Tensor, torch.Tensor]  # (hidden, residual) handed to the next pipeline stage


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: Communicator, intermediate_size: int | None = None) -> None:
        """The gated activation is the config's ``hidden_activation`` (Gemma), else its ``hidden_act`` (default
        SiLU)."""
        super().__init__()
        hf = config.hf_config
        act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None) or "silu"
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], False, tp)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, False, tp)
        self.act = gated_activation(act)
        self.silu = isinstance(self.act, SiluAndMul)  # the fused one-row kernels are SiLU's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``down_proj(act(gate) * up)``, one kernel on a single CUDA row with SiLU."""
        if not self.silu:
            return self.down_proj(self.act(gate_up))
        return silu_mul_linear(self.act, self.down_proj, gate_up)

    def forward_normed(
        self, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(norm(hidden + residual)), hidden + residual)``: the decoder layer's second half, the norm
        fused into the gate/up projection where that pays (``fused_linear.norm_linear``)."""
        gate_up, residual = norm_linear(norm, self.gate_up_proj, hidden, residual)
        return self.down(gate_up), residual

    @torch.no_grad()
    def fold_input_norm(self, g: torch.Tensor) -> bool:
        """Fold the scale ``g`` of the norm before the MLP into ``gate_up_proj`` (``W diag(g)``, rounded once);
        returns True (the norm's weight may be set to 1)."""
        g = g.float()
        for rows in self.gate_up_proj.weight.data.split(4096):  # an fp32 copy of a few rows at a time
            rows.copy_(rows.float() * g)
        return True

    def runs_folded(self, x: torch.Tensor, batch: ForwardBatch) -> bool:
        return self.silu and one_row_gemvs(x, self.gate_up_proj, self.down_proj)

    def forward_folded(
        self, h: torch.Tensor, norm: object, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h + mlp(rmsnorm(h)), sumsq)`` on one CUDA row, the norm (``NormOfInput``) inside the gate/up GEMV
        and the residual add with the next norm's sums of squares in the down GEMV."""
        ops = cuda_ops()
        gate_up = ops.normed_gemv(h, norm, self.gate_up_proj.weight)
        return ops.residual_gemv(gate_up, self.down_proj.weight, h, silu_mul=True)


MlpFactory = Callable[[int], nn.Module]  # global layer index -> that layer's MLP (dense or MoE)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        flags: DecoderFlags,
        tp: Communicator,
        mlp: nn.Module | None = None,
        global_layer_id: int | None = None,
    ) -> None:
        """``mlp``: anything with ``forward_normed`` (default: the dense :class:`LlamaMLP`)."""
        super().__init__()
        if not flags.llama_layer:
            raise ValueError("post-norms or residual multipliers need decoder_variants.VariantDecoderLayer")
        self.self_attn = LlamaAttention(config, layer_id, flags, tp, global_layer_id)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp_folds_norm = (
            False  # the post-attention norm's scale is in the MLP's weights (fold_norm_weights)
        )

    def forward(
        self, cos_sin: CosSin, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The norms and projections go through fused_linear, which fuses what pays on a one-row CUDA step.
        attn = self.self_attn
        if attn.fuses_rotary_store(hidden, batch):
            store = attn.store_args(cos_sin, batch)
            qkv, residual = norm_qkv_rotary_store(
                self.input_layernorm, attn.qkv_proj, hidden, residual, store
            )
            hidden = attn(cos_sin, qkv, batch, rotated_and_stored=True)
        else:
            qkv, residual = norm_linear(self.input_layernorm, attn.qkv_proj, hidden, residual)
            hidden = attn(cos_sin, qkv, batch)
        return self.mlp.forward_normed(self.post_attention_layernorm, hidden, residual, batch)

    def runs_folded(self, x: torch.Tensor, batch: ForwardBatch) -> bool:
        """Whether :meth:`forward_folded` takes a step whose rows are like ``x`` (one CUDA row, plain layers)."""
        attn = self.self_attn
        qkv_ok = attn.fuses_rotary_store(x, batch) or (
            attn.folds_input_norm and batch.kv_pool.dtype == x.dtype and one_row_gemvs(x, attn.qkv_proj)
        )
        return qkv_ok and one_row_gemvs(x, attn.o_proj) and self.mlp.runs_folded(x, batch)

    def forward_folded(
        self, cos_sin: CosSin, h: torch.Tensor, sumsq: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on one row of a model whose norm scales are folded into the projections after them
        (:meth:`LlamaForCausalLM.fold_norm_weights`), with no kernel for its norms: ``h`` is the residual
        stream (the previous layer's last projection added it) and ``sumsq`` the sums of its squares by parts
        (``None`` on the first layer, whose norm runs as a kernel). Returns the same for the next layer. The MLP
        (dense, or an MoE block) runs its half itself (``forward_folded``)."""
        ops = cuda_ops()
        attn = self.self_attn
        qkv_p, o_p = attn.qkv_proj, attn.o_proj
        if sumsq is None:
            x, norm = self.input_layernorm(h), None
        else:
            x, norm = h, ops.NormOfInput(sumsq, self.input_layernorm.eps)
        if attn.fuses_rotary_store(x, batch):  # rotary and the KV store in the QKV GEMV's epilogue
            store = attn.store_args(cos_sin, batch)
            out = attn.attend_stored(
                ops.qkv_rotary_store_gemv(x, qkv_p.weight, qkv_p.bias, store, norm=norm), batch
            )
        else:  # per-head q/k norms first: rotary and the store in a kernel of their own
            qkv = (
                ops.gemv(x, qkv_p.weight, qkv_p.bias)
                if norm is None
                else ops.normed_gemv(x, norm, qkv_p.weight, qkv_p.bias)
            )
            out = attn.rotate_store_attend(cos_sin, qkv, batch)
        h, sumsq = ops.residual_gemv(out, o_p.weight, h, o_p.bias)
        post = self.post_attention_layernorm
        norm = ops.NormOfInput(sumsq, post.eps, None if self.mlp_folds_norm else post.weight)
        return self.mlp.forward_folded(h, norm, batch)


class MissingLayer(nn.Module):
    """Stands in for a layer owned by another pipeline stage (keeps checkpoint indices aligned)."""


class LlamaModel(nn.Module):
    """The decoder stack of one pipeline stage: embedding on the first stage, final norm on the last."""

    def __init__(
        self,
        config: ModelConfig,
        flags: DecoderFlags,
        shard: ShardContext,
        make_mlp: MlpFactory,
        layer_cls: type[nn.Module] = LlamaDecoderLayer,
    ) -> None:
        """``layer_cls``: the decoder layer (:class:`LlamaDecoderLayer`'s constructor and forward)."""
        super().__init__()
        tp = shard.tp
        self.start, self.end = shard.layer_range(config.num_layers)
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, config.embedding_multiplier)
            if shard.is_first_stage
            else None
        )
        # One rotary per distinct rope parameters of the layers (Gemma 3's local and global layers differ);
        # layer i rotates with rotaries[rotary_of_layer[i]].
        distinct: list[dict] = []
        self.rotary_of_layer: list[int] = []
        for i in range(config.num_layers):
            params = config.rope_parameters_of(i)
            if params not in distinct:
                distinct.append(params)
            self.rotary_of_layer.append(distinct.index(params))
        self.rotaries = nn.ModuleList(
            RotaryEmbedding(
                config.head_dim, params, config.context_length, config.rotary_dim, flags.rotary_interleaved
            )
            for params in distinct
        )
        # A layer's KV lives at index (layer - start) of this stage's pool.
        self.layers = nn.ModuleList(
            layer_cls(config, i - self.start, flags, tp, make_mlp(i), i)
            if self.start <= i < self.end
            else MissingLayer()
            for i in range(config.num_layers)
        )
        self.norm = flags.rms_norm(config.hidden_size, config.rms_norm_eps) if shard.is_last_stage else None
        self.norms_folded = False  # see LlamaForCausalLM.fold_norm_weights
        # EAGLE-3 drafts read the residual stream at the input of these layers (num_layers: after the last one),
        # appended to ``batch.captured_hidden`` in this order (see models.llama_eagle)
        self.capture_layers: tuple[int, ...] = ()

    def forward(
        self, batch: ForwardBatch, intermediate: Intermediate | None = None
    ) -> torch.Tensor | Intermediate:
        """First stage: from token ids; later stages: from the previous stage's ``(hidden, residual)``.
        Returns the final hidden states [T, hidden] on the last stage, else ``(hidden, residual)``."""
        if intermediate is None:
            assert self.embed_tokens is not None
            hidden, residual = self.embed_tokens(batch.input_ids), None
        else:
            hidden, residual = intermediate
        cos_sins = [rotary.cos_sin_for(batch, hidden.dtype) for rotary in self.rotaries]
        layers = self.layers[self.start : self.end]
        rotary_of = self.rotary_of_layer[self.start : self.end]
        capture = self._capture_to(batch)
        if self.norms_folded and fused_linear.FOLD_NORMS and self._runs_folded(layers, hidden, batch):
            # a single stage: from token ids, or from embeddings given in their place (images)
            assert residual is None and self.norm is not None, "folded norms need a single stage"
            h, sumsq = hidden, None  # h: the residual stream at each layer's input
            for i, (layer, r) in enumerate(zip(layers, rotary_of, strict=True), self.start):
                if capture is not None:
                    self._capture(capture, i, h.clone())  # the layer may add into h in place
                h, sumsq = layer.forward_folded(cos_sins[r], h, sumsq, batch)
            if capture is not None:
                self._capture(capture, self.end, h)
            return self.norm(h)
        for i, (layer, r) in enumerate(zip(layers, rotary_of, strict=True), self.start):
            if capture is not None:
                self._capture(capture, i, hidden.clone() if residual is None else hidden + residual)
            hidden, residual = layer(cos_sins[r], hidden, residual, batch)
        if capture is not None:
            self._capture(capture, self.end, hidden + residual)
        if self.norm is None:
            assert residual is not None
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _capture_to(self, batch: ForwardBatch) -> list | None:
        """The list the captured layer inputs go to (one single-stage model: every captured layer is local)."""
        if not self.capture_layers:
            return None
        batch.captured_hidden = [None] * len(self.capture_layers)
        return batch.captured_hidden

    def _capture(self, capture: list, layer: int, stream: torch.Tensor) -> None:
        for j, wanted in enumerate(self.capture_layers):
            if wanted == layer:
                capture[j] = stream

    @staticmethod
    def _runs_folded(layers: Iterable[LlamaDecoderLayer], x: torch.Tensor, batch: ForwardBatch) -> bool:
        """Whether every layer takes its folded step: checked on one layer of each kind of MLP (dense, MoE),
        whose shapes the model's layers share."""
        one_of_each = {type(layer.mlp): layer for layer in layers}
        return all(layer.runs_folded(x, batch) for layer in one_of_each.values())


class LlamaForCausalLM(nn.Module):
    """Example::

    >>> model = LlamaForCausalLM(ModelConfig(hf_config, torch.float32))  # doctest: +SKIP
    >>> model.load_weights(iter_weights(source))  # doctest: +SKIP
    """

    stacked_params = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )
    # name -> (parameter, shard_id) tried before stacked_params (MoE families route their experts through it)
    weight_remap: Callable[[str], tuple[str, object] | None] | None = None
    decoder_layer: type[nn.Module] = LlamaDecoderLayer  # see models.decoder_variants

    def __init__(
        self, config: ModelConfig, shard: ShardContext | None = None, flags: DecoderFlags | None = None
    ) -> None:
        super().__init__()
        shard = shard or ShardContext()
        self.config = config
        self.shard = shard
        flags = flags or DecoderFlags.for_llama(config)
        self.model = LlamaModel(config, flags, shard, self.make_mlp, self.decoder_layer)
        self.lm_head = None
        if shard.is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, shard.tp)
            if config.tie_word_embeddings and self.model.embed_tokens is not None:
                self.lm_head.tie(self.model.embed_tokens)

    def make_mlp(self, layer: int) -> nn.Module:
        """The MLP of decoder layer ``layer`` (families with MoE layers override this)."""
        return LlamaMLP(self.config, self.shard.tp)

    @property
    def num_local_layers(self) -> int:
        return self.model.end - self.model.start

    def forward(
        self, batch: ForwardBatch, intermediate: Intermediate | None = None
    ) -> torch.Tensor | Intermediate:
        return self.model(batch, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        assert self.lm_head is not None, "logits are computed on the last pipeline stage"
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def fold_norm_weights(self) -> None:
        """Fold each decoder layer's two RMSNorm scales ``g`` into the projection after them (``W diag(g)``,
        rounded once) and set the norms' weights to 1: the same model up to rounding, whose one-row steps then
        run each norm inside those projections (:meth:`LlamaDecoderLayer.forward_folded`). An MoE block keeps
        its norm's scale and applies it in its kernels (``SparseMoeBlock.fold_input_norm``); the final norm
        keeps its scale. Only for a single unsharded stage without LoRA (``fused_linear.fold_norms_if_supported``)."""
        model = self.model
        layers = model.layers[model.start : model.end]
        if any(
            not layer.self_attn.folds_input_norm or not hasattr(layer.mlp, "fold_input_norm")
            for layer in layers
        ):
            return  # clipping, whole-projection q/k norms (OLMoE): the folded layer step does not take them
        for layer in layers:
            qkv_rows, g = layer.self_attn.qkv_proj.weight.data, layer.input_layernorm.weight.float()
            for rows in qkv_rows.split(4096):  # an fp32 copy of a few rows at a time
                rows.copy_(rows.float() * g)
            layer.input_layernorm.weight.fill_(1.0)
            layer.mlp_folds_norm = layer.mlp.fold_input_norm(layer.post_attention_layernorm.weight)
            if layer.mlp_folds_norm:  # else the MLP applies the scale itself (MoE blocks)
                layer.post_attention_layernorm.weight.fill_(1.0)
        model.norms_folded = True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = self.config.tie_word_embeddings
        shares_embedding = tied and self.model.embed_tokens is not None and self.lm_head is not None
        # A tied head on a stage without the embedding loads its own copy of the embedding table.
        own_head = tied and self.lm_head is not None and self.model.embed_tokens is None

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if own_head and name == "model.embed_tokens.weight":
                    yield "lm_head.weight", tensor
                elif not (own_head and name == "lm_head.weight"):
                    yield name, tensor

        skip = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if shares_embedding else ())
        load_stacked_weights(self, renamed(), self.stacked_params, skip, self.weight_remap)
