"""EAGLE draft heads over a Llama-style target (the layouts of the EAGLE repositories and SGLang's
``LlamaForCausalLMEagle`` / ``LlamaForCausalLMEagle3`` checkpoints).

Both heads draft from the target's hidden states ``f_p`` (position ``p``) and the embedding of the token after it,
so the head's row at position ``p`` is the pair ``(x_{p+1}, f_p)``; its output predicts ``x_{p+2}`` and is the
hidden state of the next draft step.

* **EAGLE-1/2** (``LlamaForCausalLMEagle``): ``fc`` over ``concat(embed(x), f)`` [2H -> H], then one Llama decoder
  layer whose input RMSNorm is skipped (EAGLE's layer 0), no final norm; the target's LM head reads the output.
  ``f`` is the target's last hidden state after its final norm.
* **EAGLE-3** (``LlamaForCausalLMEagle3``): ``fc`` [3H -> H] over three of the target's intermediate hidden states
  (the inputs of three decoder layers, see :func:`eagle3_capture_layers`); the ``midlayer`` attends over
  ``concat(input_layernorm(embed(x)), hidden_norm(h))`` [2H] with ``h`` as its residual; ``norm`` then a draft LM
  head over a reduced vocabulary whose id ``i`` is target id ``i + d2t[i]``. The next step reads the pre-norm
  output.

``fc`` of EAGLE-3 is linear and reads only target states, so :meth:`LlamaForCausalLMEagle.project_target` applies
it as the target's states are captured; both heads then take an ``H``-wide hidden input.

Checkpoint names: ``fc.*``, ``layers.0.*`` (EAGLE-1) or ``midlayer.*`` (EAGLE-3), ``norm.weight``,
``lm_head.weight``, ``d2t``, with or without a ``model.`` prefix; ``embed_tokens.weight`` and ``lm_head.weight``
may be absent, and then the target's are shared (:meth:`share_target_weights`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.errors import ModelLoadError
from sgl_ray.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from sgl_ray.layers.linear import QKVParallelLinear, ReplicatedLinear
from sgl_ray.layers.norm import RMSNorm
from sgl_ray.layers.rotary import RotaryEmbedding
from sgl_ray.models.llama import LlamaMLP
from sgl_ray.models.llama_attention import CosSin, DecoderFlags, LlamaAttention
from sgl_ray.runner.forward_batch import ForwardBatch

_STACKED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
# taken from the target when a checkpoint lacks them
SHAREABLE = ("model.embed_tokens.weight", "lm_head.weight")


def eagle3_capture_layers(hf_config: object, num_target_layers: int) -> tuple[int, ...]:
    """The target decoder layers whose *input* (the residual stream) EAGLE-3 reads, in order: the checkpoint's
    ``eagle_config.eagle_aux_hidden_state_layer_ids`` (outputs of those layers, so inputs of the next ones), else
    the inputs of layers 2, L/2 and L-3. ``L`` itself means the stream after the last layer (before the norm)."""
    eagle = getattr(hf_config, "eagle_config", None) or {}
    ids = eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None
    if ids is None:
        ids = getattr(hf_config, "eagle_aux_hidden_state_layer_ids", None)
    if ids is not None:
        layers = tuple(int(i) + 1 for i in ids)
    else:
        layers = (2, num_target_layers // 2, num_target_layers - 3)
    if len(layers) != 3 or not all(0 <= i <= num_target_layers for i in layers):
        raise ModelLoadError(
            f"EAGLE-3 reads the inputs of target layers {list(layers)}, but the target has {num_target_layers} "
            "layers; set eagle_config.eagle_aux_hidden_state_layer_ids (three ids in [-1, L-1]) in the draft's "
            "config.json"
        )
    return layers


class EagleDecoderLayer(nn.Module):
    """EAGLE-1's layer 0 (no input norm) or EAGLE-3's ``midlayer`` (attention over ``[embeds, hidden]``)."""

    def __init__(self, config: ModelConfig, flags: DecoderFlags, shard: ShardContext, eagle3: bool) -> None:
        super().__init__()
        tp = shard.tp
        self.eagle3 = eagle3
        self.self_attn = LlamaAttention(config, 0, flags, tp)
        if eagle3:
            h = config.hidden_size
            self.self_attn.qkv_proj = QKVParallelLinear(
                2 * h, config.head_dim, config.num_heads, config.num_kv_heads, flags.qkv_bias, tp
            )
            self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
            self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, cos_sin: CosSin, embeds: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp output, residual)``: their sum is the layer's output."""
        residual = hidden  # [T, H]
        x = hidden
        if self.eagle3:
            x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # [T, 2H]
        attn = self.self_attn(cos_sin, self.self_attn.qkv_proj(x), batch)
        return self.mlp.forward_normed(self.post_attention_layernorm, attn, residual, batch)


class EagleModel(nn.Module):
    """The head's body, shaped like ``LlamaModel`` where the runner looks (``layers``, ``start``, ``end``)."""

    def __init__(self, config: ModelConfig, shard: ShardContext, eagle3: bool, fc_in: int) -> None:
        super().__init__()
        h = config.hidden_size
        flags = DecoderFlags.for_llama(config)
        self.start, self.end = 0, 1
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h, shard.tp)
        bias = bool(getattr(config.hf_config, "bias", False)) and not eagle3
        self.fc = ReplicatedLinear(fc_in, h, bias, shard.tp)
        self.layers = nn.ModuleList([EagleDecoderLayer(config, flags, shard, eagle3)])
        self.rotary = RotaryEmbedding(
            config.head_dim, config.rope_parameters_of(0), config.context_length, config.rotary_dim, False
        )
        self.norm = RMSNorm(h, config.rms_norm_eps) if eagle3 else None


class LlamaForCausalLMEagle(nn.Module):
    """The EAGLE-1/2 head. Example (the runner drives it: ``speculative.eagle.EagleDraft``)::

    >>> head = LlamaForCausalLMEagle(ModelConfig(draft_hf_config, torch.float32))  # doctest: +SKIP
    >>> head.load_weights(iter_weights(source)); head.share_target_weights(target_model)  # doctest: +SKIP
    >>> hidden, to_logits = head(batch, head.project_target(target_hidden, []))  # doctest: +SKIP
    """

    eagle3 = False

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        super().__init__()
        shard = shard or ShardContext()
        self.config = config
        h = config.hidden_size
        hf = config.hf_config
        target_h = int(getattr(hf, "target_hidden_size", None) or h)
        self.target_hidden_size = target_h
        self.model = EagleModel(config, shard, self.eagle3, 3 * target_h if self.eagle3 else 2 * h)
        self.draft_vocab_size = int(getattr(hf, "draft_vocab_size", None) or config.vocab_size)
        self.lm_head = ParallelLMHead(self.draft_vocab_size, h, shard.tp)
        # draft id i -> target id i + d2t[i] (EAGLE-3's reduced vocabulary; zeros for a full one)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64), persistent=False)
        # shareable weights the checkpoint lacked (filled by share_target_weights)
        self.missing: set[str] = set()

    num_local_layers = 1

    def project_target(self, final: torch.Tensor, captured: list[torch.Tensor]) -> torch.Tensor:
        """The hidden input of the head's row for each of the target's tokens ([T, H]): EAGLE-1 the target's
        final hidden state, EAGLE-3 ``fc`` over its captured layer inputs."""
        return final

    def forward(self, batch: ForwardBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``(batch.input_ids, hidden)`` -> (the hidden input of the next draft step, what the LM head
        reads), both [T, H]."""
        m = self.model
        embeds = m.embed_tokens(batch.input_ids)  # [T, H]
        cos_sin = m.rotary.cos_sin_for(batch, embeds.dtype)
        if not self.eagle3:
            hidden = m.fc(torch.cat([embeds, hidden.to(embeds.dtype)], dim=-1))
        out, residual = m.layers[0](cos_sin, embeds, hidden, batch)
        if m.norm is None:
            out = out + residual
            return out, out
        normed, stream = m.norm(out, residual)
        return stream, normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, draft vocab] float32
        return self.lm_head(hidden).float()

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The target ids of the logits' argmax ([N])."""
        ids = logits.argmax(dim=-1)
        return ids + self.d2t[ids]

    def share_target_weights(self, target: nn.Module) -> None:
        """Take the target's embedding and LM head where the checkpoint had none. The head looks up the
        target's embedding table without the target's scale of it (Gemma's ``sqrt(hidden_size)``, Granite's
        ``embedding_multiplier``), as a head trained on a copy of that table reads it."""
        h, target_h = self.config.hidden_size, target.config.hidden_size
        if self.missing and h != target_h:
            raise ModelLoadError(
                f"the EAGLE head (hidden size {h}) lacks {sorted(self.missing)}, and the target's (hidden size "
                f"{target_h}) cannot stand in: a head narrower or wider than its target ships its own"
            )
        if "model.embed_tokens.weight" in self.missing:
            embed = target.model.embed_tokens
            if embed.multiplier != 1.0:
                embed = copy.copy(embed)  # the same weight (and TP shard), unscaled
                embed.multiplier = 1.0
            self.model.embed_tokens = embed
        if "lm_head.weight" in self.missing:
            self.lm_head = target.lm_head

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        has_d2t = False
        for raw, tensor in weights:
            name = raw.removeprefix("model.").replace("midlayer.", "layers.0.")
            if name == "d2t":
                if tuple(tensor.shape) != tuple(self.d2t.shape):
                    raise ModelLoadError(f"d2t: shape {tuple(tensor.shape)} != ({self.draft_vocab_size},)")
                self.d2t.copy_(tensor.to(torch.int64))
                has_d2t = True
                continue
            if name != "lm_head.weight":
                name = "model." + name
            shard_id = None
            for fused, part, sid in _STACKED:
                if f".{part}." in name:
                    name, shard_id = name.replace(f".{part}.", f".{fused}."), sid
                    break
            param = params.get(name)
            if param is None:
                continue  # t2d, EAGLE-1's unused input_layernorm, rotary buffers
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                try:
                    if loader is not None:
                        loader(param, tensor, shard_id)
                    elif param.shape != tensor.shape:
                        raise ValueError(f"shape {tuple(tensor.shape)} != parameter {tuple(param.shape)}")
                    else:
                        param.data.copy_(tensor)
                except ValueError as exc:
                    raise ModelLoadError(f"EAGLE head tensor {raw}: {exc}") from exc
            loaded.add(name)
        missing = set(params) - loaded
        self.missing = missing & set(SHAREABLE)
        if "lm_head.weight" in self.missing and self.draft_vocab_size != self.config.vocab_size:
            self.missing.discard("lm_head.weight")  # a reduced vocabulary's head cannot be the target's
        if self.draft_vocab_size != self.config.vocab_size and not has_d2t:
            missing.add("d2t")
        hard = sorted(missing - self.missing)
        if hard:
            raise ModelLoadError(
                f"the EAGLE head checkpoint is missing {hard[:8]}{' …' if len(hard) > 8 else ''}"
            )


class LlamaForCausalLMEagle3(LlamaForCausalLMEagle):
    """The EAGLE-3 head (see the module note)."""

    eagle3 = True

    def project_target(self, final: torch.Tensor, captured: list[torch.Tensor]) -> torch.Tensor:
        return self.model.fc(torch.cat(captured, dim=-1).to(self.model.fc.weight.dtype))  # [T, 3H] -> [T, H]
