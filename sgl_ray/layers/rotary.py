"""Rotary position embeddings (NeoX "rotate half" layout, as in Hugging Face Llama/Qwen).

cos/sin are computed in float32 with the same formulas as transformers (so fp32 outputs match it bit for bit) and
cached for positions ``[0, max_position)``. Rope types (transformers' ``rope_type``) are registered in ``_ROPE_INIT``:
each gives the inverse frequencies and the factor that scales cos and sin (1 but for YaRN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.cuda_ops import cuda_ops

# (rotary dim, rope parameters) -> (inverse frequencies [dim / 2], the factor that scales cos and sin)
RopeInit = Callable[[int, dict[str, Any]], tuple[torch.Tensor, float]]


def _default_inv_freq(dim: int, params: dict[str, Any]) -> torch.Tensor:
    base = float(params["rope_theta"])
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def _default(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(dim, params), 1.0


def _linear(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(dim, params) / float(params["factor"]), 1.0


def _llama3(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Llama 3.1 scaling: low frequencies divided by ``factor``, high ones kept, a smooth ramp in between."""
    inv_freq = _default_inv_freq(dim, params)
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_context = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071), as transformers' ``_compute_yarn_parameters``: dimensions that rotate fewer than
    ``beta_slow`` times over the original context are interpolated (divided by ``factor``), those that rotate more
    than ``beta_fast`` times are kept, with a linear ramp between; cos and sin are scaled by the attention factor
    (``0.1 ln(factor) + 1``, or the ``mscale`` / ``mscale_all_dim`` ratio of DeepSeek, or ``attention_factor``)."""
    base = params["rope_theta"]
    factor = params.get("factor")
    old_context = params.get("original_max_position_embeddings")
    if old_context is None:
        raise UnsupportedModelError("yarn rope parameters need original_max_position_embeddings")
    if factor is None:  # DeepSeek-V3 style: the ratio of the context lengths
        if "max_position_embeddings" not in params:
            raise UnsupportedModelError("yarn rope parameters need factor (or max_position_embeddings)")
        factor = params["max_position_embeddings"] / old_context
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        """The (fractional) dimension that rotates ``rotations`` times over ``old_context`` positions."""
        return (dim * math.log(old_context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)  # [dim / 2]
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: divide it by factor
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_ROPE_INIT: dict[str, RopeInit] = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin of every position up to ``max_position`` for a rope type of ``_ROPE_INIT``. A scaled rope's
    attention factor (YaRN) is folded into both caches, so every consumer (``apply``, the fused CUDA kernels that
    read the caches) applies it without knowing of it."""

    def __init__(self, head_dim: int, rope_parameters: dict[str, Any], max_position: int) -> None:
        super().__init__()
        rope_type = rope_parameters.get("rope_type", "default")
        if rope_type not in _ROPE_INIT:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported (have: {sorted(_ROPE_INIT)})"
            )
        self.head_dim = head_dim
        inv_freq, self.attention_factor = _ROPE_INIT[rope_type](head_dim, rope_parameters)  # [head_dim / 2]
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_position, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()  # [max_position, head_dim]
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for ``positions`` ([T]) as ``[T, 1, head_dim]`` in ``dtype`` — computed once per forward
        pass and shared by every layer."""
        cos = self.cos_cache[positions].unsqueeze(1)
        sin = self.sin_cache[positions].unsqueeze(1)
        return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate ``x``: [T, heads, head_dim] (query heads, key heads, or both stacked)."""
        cos, sin = cos_sin
        if x.is_cuda:  # one kernel, reading x through its strides (q and k straight out of the QKV output)
            return cuda_ops().rotary(x, cos, sin)
        return x * cos + rotate_half(x) * sin
