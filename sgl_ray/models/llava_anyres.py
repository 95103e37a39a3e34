"""LLaVA-NeXT's "anyres" image layout, shared by the processor (how many tokens an image takes) and the model (how
its crops' features are packed into those tokens), so the two cannot disagree.

An image of ``height x width`` pixels is resized into the best of ``image_grid_pinpoints`` (transformers'
``select_best_resolution``) and cut into ``rows x cols`` crops of ``crop_size`` pixels; a resized copy of the
whole image comes first (the base crop). The tower turns each crop into ``side x side`` features. The crops'
features are tiled into one ``rows*side x cols*side`` grid, the rows or columns that only hold the letterbox
padding are cut away (unpadding), and LLaVA-OneVision (``anyres_max_N``) scales a grid larger than about ``N``
crops back down to that area (bilinear). Each row of the grid ends with the learned ``image_newline`` token::

    [ base: side*side ] [ row 0: w features, newline ] [ row 1 ... ] ... [ row h-1 ... ]

An image given as its base crop alone (OneVision's images in a prompt of several) is ``side*side`` features and
one newline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple


class PackedGrid(NamedTuple):
    """Where an image's tiled crop features are cut (``top:top+height``, ``left:left+width`` of the tiled grid)
    and the size they are scaled to (``out_height x out_width``, equal to the cut unless downscaled)."""

    top: int
    height: int
    left: int
    width: int
    out_height: int
    out_width: int


@dataclass(frozen=True)
class AnyresLayout:
    """Example::

    >>> layout = AnyresLayout(crop_size=32, side=4, pinpoints=((32, 64), (64, 32), (64, 64)))
    >>> layout.crop_grid(40, 100)  # a wide image: one row of two crops
    (1, 2)
    >>> layout.crop_grid(56, 84)
    (2, 2)
    >>> layout.num_tokens(56, 84, crops=5)  # 16 base + the 6 of 8 rows the image covers, of 8 features + newline
    70
    """

    crop_size: int  # pixels of a crop's side (the tower's image_size)
    side: int  # features of a crop's side (image_size // patch_size)
    pinpoints: tuple[tuple[int, int], ...]  # the (height, width) resolutions an image may be resized into
    max_area_crops: int | None = None  # OneVision's anyres_max_N: N (None: no downscaling)

    @classmethod
    def from_config(cls, hf_config: Any) -> AnyresLayout:
        """From a LLaVA-NeXT or -OneVision config (or its language-model view carrying the LLaVA fields)."""
        vision = hf_config.vision_config
        aspect = getattr(hf_config, "vision_aspect_ratio", None)
        max_area = None
        if aspect is not None and str(aspect).startswith("anyres_max_"):
            max_area = int(str(aspect).removeprefix("anyres_max_"))
        return cls(
            crop_size=int(vision.image_size),
            side=int(vision.image_size) // int(vision.patch_size),
            pinpoints=tuple((int(h), int(w)) for h, w in hf_config.image_grid_pinpoints),
            max_area_crops=max_area,
        )

    def crop_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of crops of an image of ``height x width`` pixels (the base crop not counted)."""
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((height, width), [list(p) for p in self.pinpoints])
        return best_h // self.crop_size, best_w // self.crop_size

    def num_crops(self, height: int, width: int) -> int:
        """Crops the image processor cuts the image into, the base crop included."""
        rows, cols = self.crop_grid(height, width)
        return rows * cols + 1

    def packed_grid(self, height: int, width: int) -> PackedGrid:
        """Where the unpadded features sit in the tiled grid of the crops, and their size after downscaling."""
        rows, cols = self.crop_grid(height, width)
        grid_h, grid_w = rows * self.side, cols * self.side
        top, left, h, w = 0, 0, grid_h, grid_w
        if width / height > grid_w / grid_h:  # wider than the grid: letterbox rows above and below
            pad = (grid_h - int(round(height * (grid_w / width), 7))) // 2
            top, h = pad, grid_h - 2 * pad
        else:  # taller (or equal): letterbox columns left and right
            pad = (grid_w - int(round(width * (grid_h / height), 7))) // 2
            left, w = pad, grid_w - 2 * pad
        out_h, out_w = h, w
        if self.max_area_crops is not None:
            ratio = math.sqrt(h * w / (self.max_area_crops * self.side**2))
            if ratio > 1.1:
                out_h, out_w = int(h // ratio), int(w // ratio)
        return PackedGrid(top, h, left, w, out_h, out_w)

    def num_tokens(self, height: int, width: int, crops: int) -> int:
        """Tokens of an image of ``height x width`` pixels given as ``crops`` crops (1: its base crop alone)."""
        if crops == 1:
            return self.side**2 + 1
        grid = self.packed_grid(height, width)
        return self.side**2 + grid.out_height * (grid.out_width + 1)
