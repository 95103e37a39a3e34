"""Rotary position embeddings (NeoX "rotate half" layout, as in Hugging Face Llama/Qwen).

cos/sin are computed in float32 with the same formulas as transformers (so fp32 outputs match it bit for bit) and
cached for positions ``[0, max_position)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.cuda_ops import cuda_ops


def _default_inv_freq(dim: int, params: dict[str, Any]) -> torch.Tensor:
    base = float(params["rope_theta"])
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def _linear_inv_freq(dim: int, params: dict[str, Any]) -> torch.Tensor:
    return _default_inv_freq(dim, params) / float(params["factor"])


def _llama3_inv_freq(dim: int, params: dict[str, Any]) -> torch.Tensor:
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
    return torch.where(medium, smoothed, scaled)


_INV_FREQ: dict[str, Callable[[int, dict[str, Any]], torch.Tensor]] = {
    "default": _default_inv_freq,
    "linear": _linear_inv_freq,
    "llama3": _llama3_inv_freq,
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope_parameters: dict[str, Any], max_position: int) -> None:
        super().__init__()
        rope_type = rope_parameters.get("rope_type", "default")
        if rope_type not in _INV_FREQ:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported (have: {sorted(_INV_FREQ)})"
            )
        self.head_dim = head_dim
        inv_freq = _INV_FREQ[rope_type](head_dim, rope_parameters)  # [head_dim / 2]
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_position, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)  # [max_position, head_dim]
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

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
