"""Prompt + images -> expanded token ids and :class:`MultimodalInputs`, on the caller's thread (never the step loop).

The pixels come from the model's Hugging Face image processor (``preprocessor_config.json``), so they match the
reference; the text side is the processor's rule: each image placeholder token becomes
``grid_t * grid_h * grid_w / merge_size**2`` of them. Positions follow Qwen2-VL's rope index (M-RoPE): text tokens
advance all three components together; an image's tokens take ``(start, start + row, start + column)`` over its
merged grid, and the text after it resumes at ``start + max(rows, columns)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sgl_ray.multimodal.inputs import (
    ImageInput,
    ImageItem,
    ImageLimits,
    InvalidImageError,
    MultimodalInputs,
    hash_pixels,
    load_image,
)


class QwenVLProcessor:
    """Example::

    >>> proc = QwenVLProcessor.from_pretrained(model_dir, hf_config)  # doctest: +SKIP
    >>> ids, mm = proc.process(tokenizer.encode("<|vision_start|><|image_pad|><|vision_end|>Hi"), [img])  # doctest: +SKIP
    """

    def __init__(self, image_processor: Any, hf_config: Any, limits: ImageLimits | None = None) -> None:
        self.image_processor = image_processor
        self.image_token_id = int(hf_config.image_token_id)
        self.merge_size = int(hf_config.vision_config.spatial_merge_size)
        self.limits = limits or ImageLimits()

    @classmethod
    def from_pretrained(
        cls, directory: str, hf_config: Any, limits: ImageLimits | None = None
    ) -> QwenVLProcessor:
        from transformers import AutoImageProcessor

        return cls(AutoImageProcessor.from_pretrained(directory), hf_config, limits)

    def process(
        self,
        input_ids: Sequence[int],
        images: Sequence[ImageInput],
        param: str = "image_data",
        names: Sequence[str] | None = None,
    ) -> tuple[list[int], MultimodalInputs]:
        """``input_ids`` with one placeholder token per image -> (the ids with each placeholder expanded, the
        images' inputs). Raises :class:`InvalidImageError` for a bad image (named ``names[i]``, default
        ``param[i]``) or a count mismatch (named ``param``)."""
        if len(images) > self.limits.max_images:
            raise InvalidImageError(
                f"{param}: {len(images)} images, over the limit of {self.limits.max_images}", param=param
            )
        slots = [i for i, t in enumerate(input_ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise InvalidImageError(
                f"{param}: the prompt has {len(slots)} image placeholders for {len(images)} images",
                param=param,
            )
        names = names or [f"{param}[{i}]" for i in range(len(images))]
        decoded = [load_image(image, self.limits, name) for image, name in zip(images, names, strict=True)]
        out = self.image_processor(images=decoded, return_tensors="np")
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        grids = [tuple(int(x) for x in g) for g in np.asarray(out["image_grid_thw"])]
        ids: list[int] = []
        items: list[ImageItem] = []
        start, patch = 0, 0
        for slot, grid in zip(slots, grids, strict=True):
            ids.extend(input_ids[start:slot])
            n_patches = grid[0] * grid[1] * grid[2]
            n_tokens = n_patches // self.merge_size**2
            values = pixels[patch : patch + n_patches]
            items.append(ImageItem(hash_pixels(values, grid), len(ids), n_tokens, grid, values))
            ids.extend([self.image_token_id] * n_tokens)
            start, patch = slot + 1, patch + n_patches
        ids.extend(input_ids[start:])
        positions, delta = self.rope_index(len(ids), items)
        return ids, MultimodalInputs(items, positions, delta, self.image_token_id)

    def rope_index(self, length: int, images: Sequence[ImageItem]) -> tuple[np.ndarray, int]:
        """M-RoPE positions [3, length] of a prompt and the delta of the positions after it (see the module)."""
        parts, pos, done = [], 0, 0
        for image in images:
            text = image.offset - done
            parts.append(np.broadcast_to(np.arange(pos, pos + text), (3, text)))
            pos += text
            t, h, w = (
                image.grid_thw[0],
                image.grid_thw[1] // self.merge_size,
                image.grid_thw[2] // self.merge_size,
            )
            grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(
                3, -1
            )
            parts.append(grid + pos)
            pos += max(h, w)
            done = image.offset + image.num_tokens
        parts.append(np.broadcast_to(np.arange(pos, pos + length - done), (3, length - done)))
        positions = np.concatenate(parts, axis=1).astype(np.int64)
        return positions, int(positions.max(initial=-1)) + 1 - length


# Hugging Face architecture -> the processor of its image inputs
_PROCESSORS: dict[str, type[QwenVLProcessor]] = {
    "Qwen2VLForConditionalGeneration": QwenVLProcessor,
    "Qwen2_5_VLForConditionalGeneration": QwenVLProcessor,
}


def create_processor(
    hf_config: Any, directory: str, limits: ImageLimits | None = None
) -> QwenVLProcessor | None:
    """The image processor of a VL model (None for a text model); raises for a VL architecture not served."""
    from sgl_ray.errors import ModelLoadError, UnsupportedModelError
    from sgl_ray.multimodal.config import is_multimodal_config

    if not is_multimodal_config(hf_config):
        return None
    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    if arch not in _PROCESSORS:
        raise UnsupportedModelError(
            f"image inputs of {arch!r} are not supported (have: {sorted(_PROCESSORS)})"
        )
    try:
        return _PROCESSORS[arch].from_pretrained(directory, hf_config, limits)
    except OSError as exc:  # no preprocessor_config.json
        raise ModelLoadError(f"cannot load the image processor of {directory}: {exc}") from exc


def attach_images(
    processor: QwenVLProcessor | None, token_lists: list[list[int]], image_data: Any, is_batch: bool
) -> tuple[list[list[int]], list[MultimodalInputs | None]]:
    """``generate``'s ``image_data`` (one image or a list for one prompt; a list of those, one per prompt, for a
    batch) applied to the prompts: their ids with expanded placeholders, and each prompt's inputs (None: none)."""
    from sgl_ray.errors import InvalidRequestError

    n = len(token_lists)
    if image_data is None:
        return token_lists, [None] * n
    if processor is None:
        raise InvalidRequestError("this model takes no image inputs", param="image_data")
    if not is_batch:
        per_prompt, params = [image_data], ["image_data"]
    elif isinstance(image_data, (list, tuple)) and len(image_data) == n:
        per_prompt, params = list(image_data), [f"image_data[{i}]" for i in range(n)]
    else:
        raise InvalidRequestError("image_data must be a list with one entry per prompt", param="image_data")
    ids_out, mms = [], []
    for ids, images, param in zip(token_lists, per_prompt, params, strict=True):
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            ids_out.append(ids)
            mms.append(None)
            continue
        expanded, mm = processor.process(ids, images, param)
        ids_out.append(expanded)
        mms.append(mm)
    return ids_out, mms
