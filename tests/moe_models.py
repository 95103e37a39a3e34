"""Tiny random-weight MoE models of each family (the shape of ``conftest._TINY_SHAPE``, SmolLM2's vocabulary), and
their transformers references. Built lazily, once per session, by the ``moe_model`` / ``moe_reference``
fixtures of ``tests/conftest.py``."""

from __future__ import annotations

from transformers import (
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

_SHAPE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=8192,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    initializer_range=0.2,  # peaked logits and router scores: greedy and top-k are not decided by rounding
    tie_word_embeddings=False,
)


def moe_config(name: str) -> PretrainedConfig:
    """Each family's quirks: Qwen3-MoE per-head q/k norms and a dense layer (``mlp_only_layers``); Qwen2-MoE
    shared experts with their sigmoid gate and q/k/v biases; Mixtral 4 experts top-2 renormalized; OLMoE q/k
    norms over the whole projection and q/k/v clipping; GPT-OSS sinks, alternating 6-token windows, YaRN,
    biased experts with the clamped activation."""
    if name == "qwen3_moe":
        return Qwen3MoeConfig(
            **_SHAPE,
            head_dim=16,
            num_hidden_layers=3,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        )
    if name == "qwen2_moe":
        return Qwen2MoeConfig(
            **_SHAPE,
            num_hidden_layers=2,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
        )
    if name == "mixtral":
        return MixtralConfig(
            **_SHAPE, num_hidden_layers=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2
        )
    if name == "olmoe":
        return OlmoeConfig(
            **_SHAPE,
            num_hidden_layers=2,
            intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            clip_qkv=3.0,
        )
    if name == "gpt_oss":
        return GptOssConfig(
            **_SHAPE,
            head_dim=16,
            num_hidden_layers=2,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 256,
            },
        )
    raise KeyError(name)


MOE_MODELS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")
