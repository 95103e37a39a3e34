"""Gated activations: ``act(gate) * up`` for ``x = [gate | up]``, the activation named by the model's config
(:func:`gated_activation`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.cuda_ops import cuda_ops


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * inter] -> [T, inter]
        if x.is_cuda and x.dim() == 2:
            return cuda_ops().silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """``gelu(gate) * up`` with GELU's tanh approximation (transformers' ``gelu_pytorch_tanh``: Gemma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * inter] -> [T, inter]
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


_GATED = {"silu": SiluAndMul, "swish": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}


def gated_activation(name: str) -> nn.Module:
    """The gated activation for a config's ``hidden_act``/``hidden_activation``.

    >>> type(gated_activation("gelu_pytorch_tanh")).__name__
    'GeluTanhAndMul'
    """
    try:
        return _GATED[name]()
    except KeyError:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported (have: {', '.join(sorted(_GATED))})"
        ) from None
