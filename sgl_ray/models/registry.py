"""Hugging Face architecture name → model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

from sgl_ray.errors import UnsupportedModelError

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("sgl_ray.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("sgl_ray.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("sgl_ray.models.qwen", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("sgl_ray.models.qwen", "Qwen3ForCausalLM"),
    "Qwen2VLForConditionalGeneration": ("sgl_ray.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    # the same model: the vision tower's flags come from its config (models.qwen2_vl_vision.VisionShape)
    "Qwen2_5_VLForConditionalGeneration": ("sgl_ray.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": ("sgl_ray.models.llava", "LlavaNextForConditionalGeneration"),
    "LlavaOnevisionForConditionalGeneration": (
        "sgl_ray.models.llava",
        "LlavaOnevisionForConditionalGeneration",
    ),
    "Olmo2ForCausalLM": ("sgl_ray.models.olmo2", "Olmo2ForCausalLM"),
    "GraniteForCausalLM": ("sgl_ray.models.granite", "GraniteForCausalLM"),
    "Phi3ForCausalLM": ("sgl_ray.models.phi3", "Phi3ForCausalLM"),
    "Glm4ForCausalLM": ("sgl_ray.models.glm4", "Glm4ForCausalLM"),
    "Gemma2ForCausalLM": ("sgl_ray.models.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("sgl_ray.models.gemma", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("sgl_ray.models.gemma3_vl", "Gemma3ForConditionalGeneration"),
    "MixtralForCausalLM": ("sgl_ray.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("sgl_ray.models.qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("sgl_ray.models.qwen_moe", "Qwen3MoeForCausalLM"),
    "OlmoeForCausalLM": ("sgl_ray.models.olmoe", "OlmoeForCausalLM"),
    "GptOssForCausalLM": ("sgl_ray.models.gpt_oss", "GptOssForCausalLM"),
    "DeepseekV2ForCausalLM": ("sgl_ray.models.deepseek", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("sgl_ray.models.deepseek", "DeepseekV3ForCausalLM"),
    # EAGLE draft heads (speculative_algorithm EAGLE / EAGLE3 load them, whatever their config names)
    "LlamaForCausalLMEagle": ("sgl_ray.models.llama_eagle", "LlamaForCausalLMEagle"),
    "LlamaForCausalLMEagle3": ("sgl_ray.models.llama_eagle", "LlamaForCausalLMEagle3"),
    # DeepSeek-V3's multi-token-prediction layer (EAGLE without a head checkpoint on a V3 target)
    "DeepseekV3ForCausalLMNextN": ("sgl_ray.models.deepseek_mtp", "DeepseekV3ForCausalLMNextN"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """Example::

    >>> get_model_class("Qwen2ForCausalLM").__name__
    'Qwen2ForCausalLM'
    """
    try:
        module, name = _MODELS[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported (have: {', '.join(supported_architectures())})"
        ) from None
    return getattr(importlib.import_module(module), name)
