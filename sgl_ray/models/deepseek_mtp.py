"""DeepSeek-V3's multi-token-prediction (MTP, "NextN") layer as a draft head (``speculative.mtp``).

A V3 checkpoint stores its MTP layer ``i`` after the decoder layers, as ``model.layers.{num_hidden_layers + i}.*``:
``enorm``, ``hnorm``, ``eh_proj`` (2H -> H), one full decoder layer (MLA attention, and the MoE or dense MLP that a
V3 layer at that index has), ``shared_head.norm``, ``shared_head.head`` (an LM head) and often ``embed_tokens``;
without the last two the target's embedding and LM head are used. The layer's row at position ``p`` is the pair
``(x_{p+1}, f_p)`` like an EAGLE head's::

    e = enorm(embed(x_{p+1}));  g = hnorm(f_p)            # f_p: the target's final (normed) hidden state at p
    h = decoder_layer(eh_proj(concat(e, g)))              # [T, H], MLA over the layer's own latent KV
    out = shared_head.norm(h)                             # the LM head reads it; the next draft step's f

which is the arithmetic of SGLang's ``DeepseekV3ForCausalLMNextN``: its target hands over the hidden states after
the final norm, and later draft steps reuse the layer with its own normed output as ``f``.

The module is the V3 model built with one decoder layer (the MTP's MLP chosen by its checkpoint index), so its KV pool,
attention backend and expert kernels are the target's kinds; ``shared_head.norm`` is the body's final norm.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.distributed import ShardContext
from sgl_ray.errors import ModelLoadError
from sgl_ray.layers.linear import ReplicatedLinear
from sgl_ray.layers.norm import RMSNorm
from sgl_ray.models.deepseek import DeepseekV3ForCausalLM
from sgl_ray.models.moe import MoeForCausalLM
from sgl_ray.runner.forward_batch import ForwardBatch

ARCHITECTURE = "DeepseekV3ForCausalLMNextN"
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"
# checkpoint name after "model.layers.{N}." -> ours (anything else belongs to the decoder layer)
_OWN_PARTS = (
    ("enorm.", "model.enorm."),
    ("hnorm.", "model.hnorm."),
    ("eh_proj.", "model.eh_proj."),
    ("shared_head.norm.", "model.norm."),
    ("shared_head.head.", "lm_head."),
    ("embed_tokens.", "model.embed_tokens."),
)


def num_mtp_layers(hf_config: object) -> int:
    """The multi-token-prediction layers a config declares (``num_nextn_predict_layers``; 0 when absent)."""
    return int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)


def mtp_hf_config(target_hf_config: object, index: int = 0) -> object:
    """The config of MTP layer ``index`` as a one-layer model: the target's, with ``mtp_layer_id`` the layer's
    index in the checkpoint."""
    hf = copy.deepcopy(target_hf_config)
    hf.mtp_layer_id = int(target_hf_config.num_hidden_layers) + index
    hf.num_hidden_layers = 1
    hf.architectures = [ARCHITECTURE]
    return hf


class DeepseekV3ForCausalLMNextN(DeepseekV3ForCausalLM):
    """The MTP layer with the EAGLE head interface (``speculative.eagle.EagleDraft`` drives it). Example::

    >>> head = DeepseekV3ForCausalLMNextN(ModelConfig(mtp_hf_config(target_hf), torch.float32))  # doctest: +SKIP
    >>> head.load_weights(iter_weights(target_source)); head.share_target_weights(target)  # doctest: +SKIP
    >>> hidden, to_logits = head(batch, target_final_hidden)  # doctest: +SKIP
    """

    eagle3 = False

    def __init__(self, config: ModelConfig, shard: ShardContext | None = None) -> None:
        super().__init__(config, shard)
        hf, h = config.hf_config, config.hidden_size
        self.layer_id = int(hf.mtp_layer_id)
        m = self.model
        m.enorm = RMSNorm(h, config.rms_norm_eps)
        m.hnorm = RMSNorm(h, config.rms_norm_eps)
        m.eh_proj = ReplicatedLinear(2 * h, h, False, self.shard.tp)
        self.register_buffer("d2t", torch.zeros(config.vocab_size, dtype=torch.int64), persistent=False)
        self.missing: set[str] = set()  # the embedding / LM head the checkpoint's layer lacked (the target's)

    def make_mlp(self, layer: int) -> nn.Module:
        return super().make_mlp(int(self.config.hf_config.mtp_layer_id))  # as the V3 layer at that index

    def project_target(self, final: torch.Tensor, captured: list[torch.Tensor]) -> torch.Tensor:
        return final

    def forward(self, batch: ForwardBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Rows ``(batch.input_ids, hidden)`` -> (the next draft step's hidden input, what the LM head reads):
        both the normed output, [T, H]."""
        m = self.model
        embeds = m.embed_tokens(batch.input_ids)  # [T, H]
        x = m.eh_proj(torch.cat([m.enorm(embeds), m.hnorm(hidden.to(embeds.dtype))], dim=-1))
        cos_sin = m.rotaries[0].cos_sin_for(batch, x.dtype)
        h, residual = m.layers[0](cos_sin, x, None, batch)
        out, _ = m.norm(h, residual)
        return out, out

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    def share_target_weights(self, target: nn.Module) -> None:
        if _EMBED in self.missing:
            self.model.embed_tokens = target.model.embed_tokens
        if _HEAD in self.missing:
            self.lm_head = target.lm_head

    def _ours(self, name: str) -> str | None:
        """Our parameter name for a checkpoint tensor of the MTP layer, else None."""
        prefix = f"model.layers.{self.layer_id}."
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix) :]
        for theirs, ours in _OWN_PARTS:
            if rest.startswith(theirs):
                return ours + rest[len(theirs) :]
        return "model.layers.0." + rest

    def wants_weight(self, name: str) -> bool:
        ours = self._ours(name)
        return ours is not None and MoeForCausalLM.wants_weight(self, ours)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the MTP layer's tensors out of the target's checkpoint (every other tensor is skipped)."""
        embed, head = self.model.embed_tokens, self.lm_head
        own: set[str] = set()
        seen = 0

        def mtp_only() -> Iterable[tuple[str, torch.Tensor]]:
            nonlocal seen
            for name, tensor in weights:
                ours = self._ours(name)
                if ours is None:
                    continue
                seen += 1
                if ours in (_EMBED, _HEAD):  # optional: loaded aside, the target's shared when absent
                    param = (embed if ours == _EMBED else head).weight
                    loader = getattr(param, "weight_loader", None)
                    with torch.no_grad():
                        if loader is not None:
                            loader(param, tensor, None)
                        else:
                            param.data.copy_(tensor)
                    own.add(ours)
                    continue
                yield ours, tensor

        self.model.embed_tokens, self.lm_head = None, None
        try:
            MoeForCausalLM.load_weights(self, mtp_only())
        except ModelLoadError as exc:
            if seen == 0:
                raise ModelLoadError(
                    f"the checkpoint holds no tensors of its multi-token-prediction layer "
                    f"(model.layers.{self.layer_id}.*), though its config declares num_nextn_predict_layers="
                    f"{num_mtp_layers(self.config.hf_config)}; pass an EAGLE head as "
                    "speculative_draft_model_path instead"
                ) from exc
            raise ModelLoadError(
                f"the multi-token-prediction layer model.layers.{self.layer_id}: {exc}"
            ) from exc
        finally:
            self.model.embed_tokens, self.lm_head = embed, head
        self.missing = {_EMBED, _HEAD} - own
