"""Rotary position embeddings: NeoX "rotate half" layout (Hugging Face Llama/Qwen), or pairs ``(2i, 2i + 1)``
(``interleaved``: GLM), over the whole head or its first ``rotary_dim`` dimensions (partial rotary: Phi-4-mini,
GLM-4; the rest passes unrotated).

cos/sin are computed in float32 with the same formulas as transformers (so fp32 outputs match it bit for bit) and
cached for positions ``[0, max_position)``. Rope types (transformers' ``rope_type``) are registered in ``_ROPE_INIT``:
each gives the inverse frequencies and the factor that scales cos and sin (1 but for YaRN and LongRoPE). LongRoPE
has a second table, of its long factors (see :meth:`RotaryEmbedding.cos_sin_for`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.cuda_ops import cuda_ops

if TYPE_CHECKING:
    from sgl_ray.runner.forward_batch import ForwardBatch

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


def _longrope_inv_freq(dim: int, params: dict[str, Any], factors: str) -> torch.Tensor:
    """The inverse frequencies divided by one rescale factor per dimension pair (``short_factor`` or
    ``long_factor``)."""
    ext = torch.tensor(params[factors], dtype=torch.float32)
    if ext.numel() != dim // 2:
        raise UnsupportedModelError(
            f"longrope {factors} has {ext.numel()} entries, the rotary needs {dim // 2}"
        )
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * float(params["rope_theta"]) ** shape)


def _longrope(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): the short factors' frequencies (:class:`RotaryEmbedding` builds the long ones too); cos
    and sin scaled by ``attention_factor``, else ``sqrt(1 + ln(factor) / ln(original context))`` with ``factor``
    defaulting to the ratio of the context lengths (transformers' ``_compute_longrope_parameters``)."""
    old_context = params.get("original_max_position_embeddings")
    if old_context is None:
        raise UnsupportedModelError("longrope rope parameters need original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        factor = params["max_position_embeddings"] / old_context
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_context))
    return _longrope_inv_freq(dim, params, "short_factor"), float(attention_factor)


_ROPE_INIT: dict[str, RopeInit] = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
    "longrope": _longrope,
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: the interleaved layout's ``rotate_half``."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """cos/sin of every position up to ``max_position`` for a rope type of ``_ROPE_INIT``. A scaled rope's
    attention factor (YaRN, LongRoPE) is folded into both caches, so every consumer (``apply``, the fused CUDA
    kernels that read the caches) applies it without knowing of it. ``rotary_dim`` (default: ``head_dim``): the
    leading dimensions of each head that rotate; ``interleaved``: the caches hold each frequency twice in a row,
    for :func:`rotate_pairs`."""

    def __init__(
        self,
        head_dim: int,
        rope_parameters: dict[str, Any],
        max_position: int,
        rotary_dim: int | None = None,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        rope_type = rope_parameters.get("rope_type", "default")
        if rope_type not in _ROPE_INIT:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported (have: {sorted(_ROPE_INIT)})"
            )
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.interleaved = interleaved
        self.max_position = max_position
        inv_freq, self.attention_factor = _ROPE_INIT[rope_type](self.rotary_dim, rope_parameters)
        cos, sin = self._table(inv_freq, max_position)  # [max_position, rotary_dim]
        # LongRoPE: rows [max_position, 2 * max_position) hold the long factors' table, used by the tokens of a
        # sequence longer than the original context (``long_after``).
        self.long_after: int | None = None
        if rope_type == "longrope":
            self.long_after = int(rope_parameters["original_max_position_embeddings"])
            long_cos, long_sin = self._table(
                _longrope_inv_freq(self.rotary_dim, rope_parameters, "long_factor"), max_position
            )
            cos, sin = torch.cat((cos, long_cos)), torch.cat((sin, long_sin))
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def _table(self, inv_freq: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_position, rotary_dim / 2]
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()  # [max_position, rotary_dim]
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos, sin

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for ``positions`` ([T]) as ``[T, 1, rotary_dim]`` in ``dtype`` — computed once per forward
        pass and shared by every layer. LongRoPE: ``seq_lens`` [T], the length of each token's sequence in this
        pass, picks the long factors' rows where it exceeds the original context (default: the short ones)."""
        if self.long_after is not None and seq_lens is not None:
            positions = positions + (seq_lens > self.long_after).to(positions.dtype) * self.max_position
        cos = self.cos_cache[positions].unsqueeze(1)
        sin = self.sin_cache[positions].unsqueeze(1)
        return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))

    def cos_sin_for(self, batch: ForwardBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`cos_sin` of a forward batch's tokens.

        LongRoPE follows transformers: a forward pass whose sequence is longer than the original context rotates
        all its new tokens with the long factors, and keys cached before keep their rotation. Here that holds per
        request: each token's sequence length is its request's ``seq_lens`` in this step (a decode token's
        position + 1). A prompt split into prefill chunks therefore rotates its first chunks as the shorter
        sequences they are then, as transformers would if fed the same chunks."""
        if self.long_after is None:
            return self.cos_sin(batch.positions, dtype)
        if batch.is_decode:
            seq_lens = batch.positions + 1
        else:
            extend_lens = torch.from_numpy(batch.extend_lens_cpu).to(batch.seq_lens.device)
            seq_lens = torch.repeat_interleave(batch.seq_lens, extend_lens, output_size=batch.num_tokens)
        return self.cos_sin(batch.positions, dtype, seq_lens)

    @staticmethod
    def apply(
        x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], interleaved: bool = False
    ) -> torch.Tensor:
        """Rotate ``x``: [T, heads, head_dim] (query heads, key heads, or both stacked); a partial rotary's
        cos/sin ([T, 1, rotary_dim < head_dim]) rotate the leading dimensions and pass the rest."""
        cos, sin = cos_sin
        rotary_dim = cos.shape[-1]
        whole = rotary_dim == x.shape[-1]
        if x.is_cuda and whole and not interleaved:
            # one kernel, reading x through its strides (q and k straight out of the QKV output)
            return cuda_ops().rotary(x, cos, sin)
        rotate = rotate_pairs if interleaved else rotate_half
        if whole:
            return x * cos + rotate(x) * sin
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)
