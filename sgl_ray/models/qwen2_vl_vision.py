"""The vision tower of Qwen2-VL and Qwen2.5-VL: patch embedding, transformer blocks with a 2D rotary (row, column
of each patch), and the patch merger that folds each ``merge_size x merge_size`` block of patches into one
language-model token. Qwen2.5-VL's differs by flags (:class:`VisionShape`): RMSNorms, a gated MLP, and window
attention in all blocks but ``fullatt_block_indexes``.

Patches arrive in the image processor's order: block-major over the merge blocks (the ``merge_size**2`` patches of
one block are consecutive), which the rotary's row/column ids and the merger's reshape both follow. Attention is
full within each frame of an image (or each window of it) and never across images. Weights are replicated on
every tensor-parallel rank.

Window attention (Qwen2.5-VL) works on merge units (the ``merge_size**2`` patches of one token): the units are
reordered window by window (``window_size`` pixels square, the last row and column of windows cut short), every
block runs on that order, and the merger's tokens are put back in the processor's order at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from sgl_ray.layers.rotary import rotate_half


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with stride = kernel, applied as the matmul it is on flattened patches."""

    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Module()
        shape = (embed_dim, in_channels, temporal_patch_size, patch_size, patch_size)
        self.proj.weight = nn.Parameter(torch.empty(shape))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [P, C * t * p * p] -> [P, embed_dim]
        weight = self.proj.weight
        return pixels.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()


@dataclass(frozen=True)
class VisionShape:
    dim: int
    num_heads: int
    mlp_hidden: int
    act: str
    out_dim: int  # the language model's hidden size
    rms_norm: bool = False  # Qwen2.5-VL: RMSNorms (else LayerNorms)
    gated_mlp: bool = False  # Qwen2.5-VL: down(act(gate(x)) * up(x)) with biases (else fc2(act(fc1(x))))
    window_size: int = 0  # Qwen2.5-VL: window attention over windows of this many pixels (0: none)
    full_attention_blocks: tuple[int, ...] = ()  # blocks attending over the whole frame despite windows

    @classmethod
    def from_config(cls, config: Any) -> VisionShape:
        if getattr(config, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL
            return cls(
                config.hidden_size,
                config.num_heads,
                config.intermediate_size,
                config.hidden_act,
                config.out_hidden_size,
                rms_norm=True,
                gated_mlp=True,
                window_size=config.window_size,
                full_attention_blocks=tuple(config.fullatt_block_indexes),
            )
        dim = config.embed_dim
        return cls(dim, config.num_heads, int(dim * config.mlp_ratio), config.hidden_act, config.hidden_size)

    def norm(self) -> nn.Module:
        return VisionRMSNorm(self.dim) if self.rms_norm else nn.LayerNorm(self.dim, eps=1e-6)


class VisionRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class GatedVisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Segments:
    """Attention segments (frames or windows): consecutive runs of patches of the given ``lengths`` that attend
    only within themselves. Segments of one length run as one batched attention call: an image cut into windows
    has at most four lengths (whole windows, the short last column and row, the corner), so a tower call over
    many images makes a handful of calls per block rather than one per window."""

    def __init__(self, lengths: list[int], device: torch.device) -> None:
        self.total = sum(lengths)
        self.whole = len(lengths) == 1  # one segment: no gather
        starts: dict[int, list[int]] = {}
        offset = 0
        for n in lengths:
            starts.setdefault(n, []).append(offset)
            offset += n
        self.groups: list[tuple[int, int, torch.Tensor | None]] = []  # (length, segments, their rows or None)
        for n, firsts in starts.items():
            rows = torch.tensor(firsts).view(-1, 1) + torch.arange(n)
            contiguous = len(firsts) * n == self.total  # every segment has this length: rows are 0..total-1
            self.groups.append((n, len(firsts), None if contiguous else rows.flatten().to(device)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [P, heads, head_dim] -> [P, heads, head_dim], full attention within each segment."""
        if self.whole:
            return F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            ).transpose(0, 1)
        out = torch.empty_like(q)
        for n, count, rows in self.groups:
            qs, ks, vs = (t if rows is None else t[rows] for t in (q, k, v))
            qs, ks, vs = (t.view(count, n, *t.shape[1:]).transpose(1, 2) for t in (qs, ks, vs))
            o = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(count * n, *q.shape[1:])
            if rows is None:
                return o
            out[rows] = o
        return out


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], segments: Segments
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)  # each [P, heads, head_dim]
        cos, sin = cos_sin  # [P, 1, head_dim] float32
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        return self.proj(segments.attend(q, k, v).reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, shape: VisionShape) -> None:
        super().__init__()
        self.norm1, self.norm2 = shape.norm(), shape.norm()
        self.attn = VisionAttention(shape.dim, shape.num_heads)
        mlp = GatedVisionMlp if shape.gated_mlp else VisionMlp
        self.mlp = mlp(shape.dim, shape.mlp_hidden, shape.act)

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], segments: Segments
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, shape: VisionShape, merge_size: int) -> None:
        super().__init__()
        dim, out_dim = shape.dim, shape.out_dim
        self.hidden = dim * merge_size**2
        self.ln_q = shape.norm()
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [P, dim] -> [P / merge**2, out_dim]
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2VisionTransformer(nn.Module):
    """Example::

    >>> tower = Qwen2VisionTransformer(hf_config.vision_config)  # doctest: +SKIP
    >>> tower(pixel_values, [(1, 4, 6)]).shape  # 24 patches -> 6 tokens  # doctest: +SKIP
    torch.Size([6, 64])
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.shape = shape = VisionShape.from_config(config)
        self.merge_size = config.spatial_merge_size
        self.patch_size = config.patch_size
        self.head_dim = shape.dim // shape.num_heads
        self.patch_embed = PatchEmbed(
            config.patch_size, config.temporal_patch_size, config.in_channels, shape.dim
        )
        self.blocks = nn.ModuleList(VisionBlock(shape) for _ in range(config.depth))
        self.merger = PatchMerger(shape, self.merge_size)
        params = getattr(config, "rope_parameters", None) or {}
        theta = float(params.get("rope_theta", 10000.0))
        quarter = (
            self.head_dim // 2
        )  # the rotary of one axis spans a quarter of the head (cos/sin are doubled)
        inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [P, 1, head_dim] of every patch from its (row, column), in the processor's block-major order."""
        m, ids = self.merge_size, []
        for t, h, w in grids:
            rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            hw = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
            ids.append(hw.repeat(t, 1))
        pos = torch.cat(ids).to(self.inv_freq.device)  # [P, 2]
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [P, head_dim / 2]: row's, then column's
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """``pixels`` [P, C * t * p * p] of the images with ``grids`` -> their tokens' embeddings [P / m**2, out]."""
        x = self.patch_embed(pixels)
        cos, sin = self.rotary(grids)
        # attention within each frame
        frames = Segments([h * w for t, h, w in grids for _ in range(t)], x.device)
        if not self.shape.window_size:
            for block in self.blocks:
                x = block(x, (cos, sin), frames)
            return self.merger(x)
        order, window_lengths = self.windows(grids)
        windows = Segments(window_lengths, x.device)
        x, cos, sin = (self._by_unit(t, order) for t in (x, cos, sin))
        for i, block in enumerate(self.blocks):
            x = block(x, (cos, sin), frames if i in self.shape.full_attention_blocks else windows)
        return self.merger(x)[torch.argsort(order)]

    def _by_unit(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Patches ``x`` [P, ...] reordered by merge unit: unit ``order[i]`` goes to place ``i``."""
        unit = self.merge_size**2
        return x.reshape(x.shape[0] // unit, unit, *x.shape[1:])[order].reshape(x.shape)

    def windows(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """(the merge units in window order [P / m**2], the patch count of each non-empty window in that order)."""
        m, unit = self.merge_size, self.merge_size**2
        side = self.shape.window_size // m // self.patch_size  # a window's side in merge units
        order: list[torch.Tensor] = []
        lengths: list[int] = []
        base = 0
        for t, h, w in grids:
            rows, cols = h // m, w // m
            units = torch.arange(t * rows * cols).reshape(t, rows, cols)
            for frame in units:
                for r0 in range(0, rows, side):
                    for c0 in range(0, cols, side):
                        window = frame[r0 : r0 + side, c0 : c0 + side].flatten()
                        order.append(window + base)
                        lengths.append(window.numel() * unit)
            base += t * rows * cols
        return torch.cat(order).to(self.inv_freq.device), lengths
