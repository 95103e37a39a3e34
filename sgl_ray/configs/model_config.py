"""What the engine needs to know about a model, read once from its Hugging Face config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from sgl_ray.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# Model files that honour their configs' sliding windows: on the layers ``layer_types`` marks
# "sliding_attention" (GPT-OSS, Gemma 2/3; Qwen2/3's from ``use_sliding_window`` and ``max_window_layers``), else on
# every layer (Mistral, Phi-3).
SLIDING_WINDOW_ARCHITECTURES = frozenset(
    {
        "GptOssForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Gemma3ForConditionalGeneration",
    }
)
# Gemma scales its token embeddings by sqrt(hidden_size) (see ModelConfig.embedding_multiplier).
GEMMA_ARCHITECTURES = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"})

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: torch.device) -> torch.dtype:
    """``auto`` keeps the checkpoint's floating dtype on GPU (fp16/bf16) and uses float32 on CPU.

    Example::

        >>> resolve_dtype("bfloat16", None, torch.device("cpu"))
        torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise InvalidRequestError(f"dtype: unknown dtype {dtype!r}", param="dtype") from None
    if device.type == "cpu":
        return torch.float32
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = _DTYPES.get(cfg_dtype, torch.float32)
    if cfg_dtype in (torch.float16, torch.bfloat16):
        return cfg_dtype
    return torch.bfloat16


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer's shape and quirks, normalized across transformers versions.

    ``hf_config`` is the source of truth; derived values are cached properties.
    """

    hf_config: Any
    dtype: torch.dtype
    context_length_override: int | None = None

    @cached_property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else f"{type(self.hf_config).__name__.removesuffix('Config')}ForCausalLM"

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.hf_config.intermediate_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @cached_property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_heads

    @cached_property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def rms_norm_eps(self) -> float:
        return getattr(self.hf_config, "rms_norm_eps", 1e-6)

    @cached_property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.hf_config, "tie_word_embeddings", False))

    @cached_property
    def rope_parameters(self) -> dict[str, Any]:
        """``{"rope_type", "rope_theta", ...scaling fields}`` whether the config uses ``rope_parameters`` (new) or
        ``rope_theta`` + ``rope_scaling`` (old). Where the config keys them by layer type (transformers 5's Gemma 3:
        ``{"full_attention": {...}, "sliding_attention": {...}}``), those of the full-attention layers; each
        layer's are :meth:`rope_parameters_of`."""
        if (by_type := self._rope_parameters_by_layer_type) is not None:
            return by_type.get("full_attention") or next(iter(by_type.values()))
        params = getattr(self.hf_config, "rope_parameters", None)
        out: dict[str, Any] = dict(params) if isinstance(params, dict) else {}
        scaling = getattr(self.hf_config, "rope_scaling", None)
        if isinstance(scaling, dict):
            out = {**scaling, **out}
        return self._completed_rope_parameters(out)

    @cached_property
    def _rope_parameters_by_layer_type(self) -> dict[str, dict[str, Any]] | None:
        params = getattr(self.hf_config, "rope_parameters", None)
        types = set(getattr(self.hf_config, "layer_types", None) or ())
        if not isinstance(params, dict) or not types or not types <= params.keys():
            return None
        return {t: self._completed_rope_parameters(dict(params[t])) for t in types}

    def rope_parameters_of(self, layer: int) -> dict[str, Any]:
        """The rope parameters of decoder layer ``layer``: :attr:`rope_parameters`, or those of the layer's type
        (``layer_types``) where the config keys them by type (Gemma 3's local layers rotate with
        ``rope_local_base_freq``, its global ones with ``rope_theta`` and the rope scaling)."""
        if (by_type := self._rope_parameters_by_layer_type) is None:
            return self.rope_parameters
        return by_type[self.hf_config.layer_types[layer]]

    def _completed_rope_parameters(self, out: dict[str, Any]) -> dict[str, Any]:
        if "rope_theta" not in out:
            out["rope_theta"] = getattr(self.hf_config, "rope_theta", 10000.0)
        out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
        if out["rope_type"] == "longrope":  # Phi-3 keeps the original context outside the rope parameters
            hf = self.hf_config
            for key in ("original_max_position_embeddings", "max_position_embeddings"):
                out.setdefault(key, getattr(hf, key, None))
        return out

    @cached_property
    def rotary_dim(self) -> int:
        """The leading dimensions of each head that rotary rotates (``partial_rotary_factor`` of the head)."""
        factor = self.rope_parameters.get("partial_rotary_factor")
        if factor is None:
            factor = getattr(self.hf_config, "partial_rotary_factor", None) or 1.0
        return int(self.head_dim * float(factor))

    @cached_property
    def embedding_multiplier(self) -> float:
        """Scale of the token embeddings before the first layer: Granite's ``embedding_multiplier``; Gemma's
        ``sqrt(hidden_size)``, rounded to the model's dtype as transformers rounds it (55.4256 is 55.5 in bf16)."""
        if self.architecture in GEMMA_ARCHITECTURES:
            return float(torch.tensor(self.hidden_size**0.5).to(self.dtype))
        return float(getattr(self.hf_config, "embedding_multiplier", None) or 1.0)

    @cached_property
    def context_length(self) -> int:
        """The override, else ``max_position_embeddings`` — capped at the sliding window of models that use one
        where the model file does not implement it (longer contexts would silently diverge)."""
        if self.context_length_override:
            return self.context_length_override
        length = int(getattr(self.hf_config, "max_position_embeddings", 4096))
        window = getattr(self.hf_config, "sliding_window", None)
        if self.architecture in SLIDING_WINDOW_ARCHITECTURES:
            return length
        if window and getattr(self.hf_config, "use_sliding_window", True) and window < length:
            logger.warning("context length capped at the sliding window (%d tokens)", window)
            length = int(window)
        return length

    def sliding_window_of(self, layer: int) -> int | None:
        """The attention window of decoder layer ``layer`` (keys within the last ``W`` positions), or None for
        full attention — for the architectures in :data:`SLIDING_WINDOW_ARCHITECTURES`: the layers their
        ``layer_types`` mark sliding, or every layer where the config has no ``layer_types`` (Mistral, Phi-3);
        every other model attends fully (and :attr:`context_length` is capped instead)."""
        if self.architecture not in SLIDING_WINDOW_ARCHITECTURES:
            return None
        types = getattr(self.hf_config, "layer_types", None)
        window = getattr(self.hf_config, "sliding_window", None)
        if not getattr(self.hf_config, "use_sliding_window", True):  # Qwen2/3 configs may disable theirs
            return None
        if not window or (types is not None and types[layer] != "sliding_attention"):
            return None
        return int(window)

    @cached_property
    def kv_window(self) -> int | None:
        """The largest window when every layer attends within one (KV older than it is never read again), else
        None."""
        windows = [self.sliding_window_of(i) for i in range(self.num_layers)]
        if not windows or any(w is None for w in windows):
            return None
        return max(w for w in windows if w is not None)

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = getattr(self.hf_config, "eos_token_id", None)
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    @cached_property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        hf = self.hf_config
        return int(getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None) or 0)

    @cached_property
    def moe_intermediate_size(self) -> int:
        return int(getattr(self.hf_config, "moe_intermediate_size", None) or self.intermediate_size)

    @cached_property
    def num_experts_per_tok(self) -> int:
        return int(getattr(self.hf_config, "num_experts_per_tok", 0) or 0)

    @cached_property
    def shared_expert_intermediate_size(self) -> int:
        """Intermediate size of the shared experts of a sparse layer (0: none): Qwen2-MoE's
        ``shared_expert_intermediate_size``, or DeepSeek's ``n_shared_experts`` experts."""
        hf = self.hf_config
        if size := getattr(hf, "shared_expert_intermediate_size", None):
            return int(size)
        return int(getattr(hf, "n_shared_experts", 0) or 0) * self.moe_intermediate_size

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has an MoE block: every layer of an MoE model but those kept dense by
        ``mlp_only_layers``, ``decoder_sparse_step`` (Qwen-MoE) or ``first_k_dense_replace`` (DeepSeek)."""
        hf = self.hf_config
        if not self.num_experts or layer in (getattr(hf, "mlp_only_layers", None) or ()):
            return False
        step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
        return (layer + 1) % step == 0 and layer >= int(getattr(hf, "first_k_dense_replace", 0) or 0)

    def check_parallel(self, tp_size: int, ep_size: int = 1) -> None:
        """Raise :class:`InvalidRequestError` at start for a layout the model cannot be split into (instead of a
        failure inside the shard actors).

        Example::

            >>> from transformers import MixtralConfig
            >>> ModelConfig(MixtralConfig(num_local_experts=8), torch.float32).check_parallel(4, ep_size=4)
            >>> ModelConfig(MixtralConfig(num_local_experts=6), torch.float32).check_parallel(4, ep_size=4)
            Traceback (most recent call last):
            ...
            sgl_ray.errors.InvalidRequestError: ep_size: 4 does not divide the model's 6 experts
        """
        if self.num_heads % tp_size:
            raise InvalidRequestError(
                f"tp_size: {tp_size} does not divide the model's {self.num_heads} attention heads",
                param="tp_size",
            )
        kv = self.num_kv_heads
        if kv % tp_size and tp_size % kv:
            raise InvalidRequestError(
                f"tp_size: {tp_size} neither divides nor is a multiple of the model's {kv} KV heads",
                param="tp_size",
            )
        if ep_size == 1:
            return
        if not self.num_experts:
            raise InvalidRequestError("ep_size: the model has no experts (not an MoE model)", param="ep_size")
        if self.num_experts % ep_size:
            raise InvalidRequestError(
                f"ep_size: {ep_size} does not divide the model's {self.num_experts} experts", param="ep_size"
            )
        moe_tp = tp_size // ep_size
        if self.moe_intermediate_size % moe_tp:
            raise InvalidRequestError(
                f"ep_size: the experts' intermediate size ({self.moe_intermediate_size}) is not divisible by "
                f"tp_size / ep_size ({moe_tp})",
                param="ep_size",
            )

    @cached_property
    def kv_latent_dim(self) -> int:
        """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2: ``kv_lora_rank`` in the config): the values one
        token's latent holds per layer (``kv_lora_rank + qk_rope_head_dim``), which the KV pool stores instead of
        per-head K and V; 0 for every other model."""
        rank = getattr(self.hf_config, "kv_lora_rank", None)
        return int(rank) + int(self.hf_config.qk_rope_head_dim) if rank else 0

    def kv_bytes_per_token(self, tp_size: int = 1, kv_dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V one token occupies across all layers of one tensor-parallel shard (an MLA model's
        latent, whole on every shard), each value a ``kv_dtype`` (default: the model's dtype; an FP8 KV cache,
        ``kv_cache_dtype``, takes one byte)."""
        element = torch.tensor([], dtype=kv_dtype or self.dtype).element_size()
        if self.kv_latent_dim:
            return self.num_layers * self.kv_latent_dim * element
        kv_heads = max(1, self.num_kv_heads // tp_size)
        return 2 * self.num_layers * kv_heads * self.head_dim * element
