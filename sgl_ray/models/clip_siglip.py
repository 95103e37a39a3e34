"""CLIP and SigLIP vision encoders (the towers of LLaVA-NeXT and LLaVA-OneVision): a patch embedding, learned
absolute positions and pre-norm transformer layers over each fixed-size crop. They differ by flags
(:class:`EncoderShape`): CLIP prepends a class token and normalises the embeddings before the first layer; SigLIP
does neither (its patch embedding has a bias).

A LLaVA model reads the hidden states *at* ``vision_feature_layer`` (``hidden_states[0]`` is the embeddings,
``hidden_states[i]`` layer ``i - 1``'s output, negative indices from the end), so the encoder holds only the layers
up to the deepest one read; the layers after it, the final norm and SigLIP's pooling head are never loaded.
Gemma 3 reads the tower's ``last_hidden_state`` instead: every layer, then the final norm (``post_layernorm``).
Weights are replicated on every tensor-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sgl_ray.models.qwen2_vl_vision import VisionMlp


@dataclass(frozen=True)
class EncoderShape:
    dim: int
    num_heads: int
    mlp_hidden: int
    act: str
    eps: float
    image_size: int
    patch_size: int
    in_channels: int
    class_token: bool  # CLIP: a learned class token before the patches, and a LayerNorm before the layers

    @classmethod
    def from_config(cls, config: Any) -> EncoderShape:
        clip = config.model_type == "clip_vision_model"
        if not clip and config.model_type != "siglip_vision_model":
            from sgl_ray.errors import UnsupportedModelError

            raise UnsupportedModelError(f"vision tower {config.model_type!r} is not supported (CLIP, SigLIP)")
        return cls(
            dim=config.hidden_size,
            num_heads=config.num_attention_heads,
            mlp_hidden=config.intermediate_size,
            act=config.hidden_act,
            eps=config.layer_norm_eps,
            image_size=config.image_size,
            patch_size=config.patch_size,
            in_channels=getattr(config, "num_channels", 3),
            class_token=clip,
        )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + int(self.class_token)


class PatchEmbeddings(nn.Module):
    def __init__(self, shape: EncoderShape) -> None:
        super().__init__()
        p = shape.patch_size
        self.patch_embedding = nn.Conv2d(
            shape.in_channels, shape.dim, p, stride=p, bias=not shape.class_token
        )
        self.position_embedding = nn.Embedding(shape.num_positions, shape.dim)
        self.class_embedding = nn.Parameter(torch.empty(shape.dim)) if shape.class_token else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [N, C, S, S] -> [N, positions, dim]
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)  # [N, patches, dim]
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class EncoderAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, dim]: full attention within each crop
        n, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [N, heads, L, head_dim]
            return t.view(n, length, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class EncoderLayer(nn.Module):
    def __init__(self, shape: EncoderShape) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(shape.dim, eps=shape.eps)
        self.self_attn = EncoderAttention(shape.dim, shape.num_heads)
        self.layer_norm2 = nn.LayerNorm(shape.dim, eps=shape.eps)
        self.mlp = VisionMlp(shape.dim, shape.mlp_hidden, shape.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, shape: EncoderShape, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(shape) for _ in range(num_layers))


class VisionEncoder(nn.Module):
    """A CLIP or SigLIP vision model reduced to the hidden states a LLaVA model reads.

    Example::

        >>> tower = VisionEncoder(hf_config.vision_config, feature_layers=[-2])  # doctest: +SKIP
        >>> tower(pixels).shape  # [crops, 3, 336, 336] -> [crops, 577, 1024]  # doctest: +SKIP
    """

    def __init__(self, config: Any, feature_layers: list[int], post_layernorm: bool = False) -> None:
        """``post_layernorm``: the output is the last layer's, through the tower's final norm (what transformers'
        ``last_hidden_state`` is; ``feature_layers`` must be ``[-1]``)."""
        super().__init__()
        self.shape = shape = EncoderShape.from_config(config)
        total = config.num_hidden_layers
        # hidden_states index of each feature layer (0: the embeddings, i: the output of layer i - 1)
        self.feature_states = [i if i >= 0 else total + 1 + i for i in feature_layers]
        if any(not 0 <= i <= total for i in self.feature_states):
            raise ValueError(f"vision_feature_layer {feature_layers} outside the tower's {total} layers")
        self.embeddings = PatchEmbeddings(shape)
        self.pre_layrnorm = nn.LayerNorm(shape.dim, eps=shape.eps) if shape.class_token else None
        self.encoder = Encoder(shape, max(self.feature_states))
        self.post_layernorm = None
        if post_layernorm:
            if self.feature_states != [total]:
                raise ValueError(f"the final norm follows the last layer, not the layers {feature_layers}")
            self.post_layernorm = nn.LayerNorm(shape.dim, eps=shape.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` [N, C, S, S] -> the feature layers' hidden states, concatenated [N, positions, dim * k]."""
        x = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = [x] if 0 in self.feature_states else []
        for i, layer in enumerate(self.encoder.layers, 1):
            x = layer(x)
            if i in self.feature_states:
                states.append(x)
        if self.post_layernorm is not None:
            return self.post_layernorm(x)
        by_index = dict(zip(sorted(set(self.feature_states)), states, strict=True))
        return torch.cat([by_index[i] for i in self.feature_states], dim=-1)
