"""YaRN rotary scaling against transformers: inverse frequencies, the attention factor folded into cos/sin, and the
rotation itself (GPT-OSS's rotary module and apply function)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DeepseekV3Config, GptOssConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.rotary import _ROPE_INIT, RotaryEmbedding

TOL = dict(atol=1e-6, rtol=1e-6)
POSITIONS = torch.tensor([0, 1, 2, 17, 4095, 4096, 4097, 30000, 131071])


def deepseek_config(**rope) -> DeepseekV3Config:
    scaling = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, **rope}
    return DeepseekV3Config(num_hidden_layers=2, max_position_embeddings=163840, rope_scaling=scaling)


CONFIGS = {  # GPT-OSS's defaults: factor 32, beta 32/1, truncate False, theta 150000
    "gpt-oss": lambda: GptOssConfig(num_hidden_layers=2),
    "deepseek-mscale": lambda: deepseek_config(mscale=0.707, mscale_all_dim=1.0, beta_fast=32, beta_slow=1),
    "deepseek-equal-mscale": lambda: deepseek_config(mscale=1.0, mscale_all_dim=1.0),  # attention factor 1
    "attention-factor": lambda: deepseek_config(attention_factor=0.8, beta_fast=16, beta_slow=2),
    "mscale-only": lambda: deepseek_config(mscale=0.707),  # mscale alone is ignored, as in transformers
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inv_freq_and_cos_sin_match_transformers(name):
    config = CONFIGS[name]()
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    params = dict(config.rope_parameters)
    assert params["rope_type"] == "yarn"
    inv_freq, factor = _ROPE_INIT["yarn"](config.head_dim, params)
    torch.testing.assert_close(inv_freq, want_inv_freq, **TOL)
    assert factor == pytest.approx(want_factor, rel=1e-12)

    rope = RotaryEmbedding(config.head_dim, params, 131072)
    assert rope.attention_factor == factor
    freqs = POSITIONS[:, None].float() * want_inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = rope.cos_sin(POSITIONS, torch.float32)  # [T, 1, head_dim]
    torch.testing.assert_close(cos[:, 0], emb.cos() * want_factor, **TOL)
    torch.testing.assert_close(sin[:, 0], emb.sin() * want_factor, **TOL)


def test_attention_factors_differ_per_config():
    """The cases above cover distinct branches of the factor: log(factor), the mscale ratio, the given value."""
    factors = {
        name: _ROPE_INIT["yarn"](64, dict(make().rope_parameters))[1] for name, make in CONFIGS.items()
    }
    assert factors["gpt-oss"] == pytest.approx(0.1 * math.log(32) + 1)
    assert factors["deepseek-equal-mscale"] == 1.0
    assert factors["attention-factor"] == 0.8
    assert factors["deepseek-mscale"] < 1.0


def test_gpt_oss_rotation_matches_transformers():
    """GPT-OSS rotates first half against second half (NeoX layout), cos/sin times the attention factor."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding, apply_rotary_pos_emb

    config = GptOssConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    hf_rope = GptOssRotaryEmbedding(config)
    q = torch.randn(1, 4, len(POSITIONS), config.head_dim, generator=torch.Generator().manual_seed(0))
    k = torch.randn(1, 2, len(POSITIONS), config.head_dim, generator=torch.Generator().manual_seed(1))
    hf_cos, hf_sin = hf_rope(q, POSITIONS[None])  # [1, T, head_dim / 2]
    want_q, want_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)

    rope = RotaryEmbedding(config.head_dim, dict(config.rope_parameters), config.max_position_embeddings)
    cos_sin = rope.cos_sin(POSITIONS, torch.float32)
    got_q = RotaryEmbedding.apply(q[0].transpose(0, 1), cos_sin)  # [T, heads, head_dim]
    got_k = RotaryEmbedding.apply(k[0].transpose(0, 1), cos_sin)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), **TOL)
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1), **TOL)


def test_default_rope_has_no_attention_factor():
    rope = RotaryEmbedding(32, {"rope_theta": 10000.0}, 64)
    assert rope.attention_factor == 1.0
    torch.testing.assert_close(rope.cos_cache[:, :16] ** 2 + rope.sin_cache[:, :16] ** 2, torch.ones(64, 16))


def test_yarn_without_original_context_is_rejected():
    with pytest.raises(UnsupportedModelError, match="original_max_position_embeddings"):
        RotaryEmbedding(64, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}, 64)
