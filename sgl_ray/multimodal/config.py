"""A vision-language checkpoint's config as the engine reads it: the language model's config at the top (the
engine sizes its KV pool, vocabulary and rotary from it) with the vision parts attached."""

from __future__ import annotations

import copy
from typing import Any

# Top-level fields of a VL config that the language-model view keeps (token ids of the image markers, the tower,
# LLaVA's image encoder: the layers it reads, its projector and the anyres layout; Gemma 3's soft tokens per image).
_CARRIED = (
    "vision_config",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "image_grid_pinpoints",
    "vision_aspect_ratio",
    "projector_hidden_act",
    "multimodal_projector_bias",
    "boi_token_id",
    "eoi_token_id",
    "mm_tokens_per_image",
)


def is_multimodal_config(hf_config: Any) -> bool:
    return getattr(hf_config, "vision_config", None) is not None


def language_model_config(hf_config: Any) -> Any:
    """``hf_config`` unchanged for a text model; for a VL one (``text_config`` + ``vision_config``), a copy of its
    ``text_config`` carrying the architecture, the tower's config and the image token ids.

    Example::

        >>> from transformers import Qwen2VLConfig
        >>> flat = language_model_config(Qwen2VLConfig(architectures=["Qwen2VLForConditionalGeneration"]))
        >>> flat.architectures, flat.hidden_size, flat.image_token_id
        (['Qwen2VLForConditionalGeneration'], 8192, 151655)
    """
    text = getattr(hf_config, "text_config", None)
    if text is None or not is_multimodal_config(hf_config):
        return hf_config
    flat = copy.deepcopy(text)
    flat.architectures = list(getattr(hf_config, "architectures", None) or [])
    for name in _CARRIED:
        if getattr(hf_config, name, None) is not None:
            setattr(flat, name, getattr(hf_config, name))
    flat.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
    return flat


def check_engine_args(hf_config: Any, args: Any) -> None:
    """Refuse, at start-up, what a vision-language model does not run with: pipeline stages (the tower and the
    decoder's first layers live together) and speculative decoding (drafts see no images, and would need M-RoPE
    positions under Qwen2-VL). A model whose image tokens attend to each other in both directions (Gemma 3)
    needs an attention backend with that mask (``supports_image_spans``: torch, Triton); FlashInfer (causal
    masks only) is refused. Each image is computed in one step (the scheduler ends prefill chunks at image
    edges)."""
    from sgl_ray.attention import backend_class, default_backend_name
    from sgl_ray.errors import UnsupportedModelError

    if not is_multimodal_config(hf_config):
        return
    if args.pp_size > 1:
        raise UnsupportedModelError("vision-language models run on a single pipeline stage (pp_size=1)")
    if args.speculative_algorithm is not None:
        raise UnsupportedModelError("speculative decoding is not supported with vision-language models")
    if not attends_images_bidirectionally(hf_config):
        return
    arch = hf_config.architectures[0]
    device = args.torch_device()
    backend = args.attention_backend or default_backend_name(device)
    if not backend_class(backend).supports_image_spans:
        raise UnsupportedModelError(
            f"{arch}: the tokens of an image attend to each other in both directions, which the {backend!r} "
            "attention backend does not implement (its masks are causal); use attention_backend='triton' "
            "(or 'torch')"
        )


def attends_images_bidirectionally(hf_config: Any) -> bool:
    """Whether the model's image tokens attend to each other in both directions during prefill (its class's
    ``bidirectional_images``, Gemma 3)."""
    from sgl_ray.errors import UnsupportedModelError
    from sgl_ray.models.registry import get_model_class

    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    try:
        return bool(getattr(get_model_class(arch), "bidirectional_images", False))
    except UnsupportedModelError:
        return False
