"""RMSNorm with an optional fused residual add (same arithmetic as Hugging Face's ``LlamaRMSNorm``; one Triton
kernel on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgl_ray.layers.cuda_ops import cuda_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused op; same arithmetic (bit-identical on CPU)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``."""
        if x.is_cuda and x.dim() == 2:  # one fused kernel instead of ~7
            return cuda_ops().rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = residual + x
        return self._norm(x), x


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm (transformers' ``Gemma2RMSNorm``/``Gemma3RMSNorm``): the checkpoint's ``weight`` is centred
    on 0 and the scale is ``1 + weight``, applied in float32 before the cast back to ``x``'s dtype (Llama's norm
    casts first, then scales). No fused CUDA kernel: :func:`~sgl_ray.layers.triton_ops.rmsnorm` rounds before
    it scales."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        if x.dtype == torch.float32:  # one fused op; same arithmetic
            return F.rms_norm(x, self.weight.shape, scale, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * scale).to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``."""
        if residual is None:
            return self._norm(x)
        x = residual + x
        return self._norm(x), x
