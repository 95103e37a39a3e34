"""Prompt + images -> expanded token ids and :class:`MultimodalInputs`, on the caller's thread (never the step loop).

The pixels come from the model's Hugging Face image processor (``preprocessor_config.json``), so they match the
reference. Each model family supplies the rest as an :class:`ImageProcessor`: the pixels of each image, how many
tokens its placeholder expands to, and the prompt's positions.

- Qwen2-VL and Qwen2.5-VL (:class:`QwenVLProcessor`): ``grid_t * grid_h * grid_w / merge_size**2`` tokens per image,
  and M-RoPE positions by Qwen2-VL's rope index: text tokens advance all three components together; an image's
  tokens take ``(start, start + row, start + column)`` over its merged grid, and the text after it resumes at
  ``start + max(rows, columns)``.
- LLaVA-NeXT and LLaVA-OneVision (:class:`LlavaProcessor`): the anyres rule of :mod:`sgl_ray.models.llava_anyres`
  and plain positions.
- Gemma 3 (:class:`Gemma3VLProcessor`): ``<start_of_image>`` becomes ``\\n\\n<start_of_image>``, then
  ``mm_tokens_per_image`` soft tokens, then ``<end_of_image>\\n\\n``, with the text next to it tokenized again (as
  transformers' ``Gemma3Processor`` tokenizes the expanded text); plain positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from sgl_ray.multimodal.config import attends_images_bidirectionally
from sgl_ray.multimodal.inputs import (
    ImageInput,
    ImageItem,
    ImageLimits,
    InvalidImageError,
    MultimodalInputs,
    hash_pixels,
    load_image,
)


class PreparedImage(NamedTuple):
    """One image as its model's family prepares it: ``pixel_values`` and ``grid`` as :class:`ImageItem` holds them,
    and the number of tokens its placeholder expands to."""

    pixel_values: np.ndarray
    grid: tuple[int, int, int]
    num_tokens: int


class ImageProcessor(ABC):
    """A model family's image preprocessing. :meth:`process` checks the limits and the placeholder count, decodes
    the images and expands each placeholder (one ``image_token_id`` per image in the prompt) to the image's tokens;
    the family says what the pixels and token counts are (:meth:`prepare`) and the prompt's positions
    (:meth:`positions`; default: plain positions, a model without M-RoPE).

    Example::

        >>> proc = create_processor(hf_config, model_dir)  # doctest: +SKIP
        >>> ids, mm = proc.process(tokenizer.encode("<image>Hi"), [img])  # doctest: +SKIP
    """

    def __init__(self, image_processor: Any, hf_config: Any, limits: ImageLimits | None = None) -> None:
        self.image_processor = image_processor
        self.image_token_id = int(hf_config.image_token_id)  # the id of an image's tokens
        self.placeholder_id = self.image_token_id  # the id standing for an image in a prompt
        self.limits = limits or ImageLimits()
        # the model attends in both directions within an image: prefill chunks end at image edges
        self.whole_images = attends_images_bidirectionally(hf_config)

    @classmethod
    def from_pretrained(
        cls, directory: str, hf_config: Any, limits: ImageLimits | None = None
    ) -> ImageProcessor:
        from transformers import AutoImageProcessor

        return cls(AutoImageProcessor.from_pretrained(directory), hf_config, limits)

    @abstractmethod
    def prepare(self, images: list[Any]) -> list[PreparedImage]:
        """The decoded RGB images of one prompt -> each one's pixels, grid and token count."""

    def positions(self, length: int, images: Sequence[ImageItem]) -> tuple[np.ndarray, int]:
        """``(MultimodalInputs.mrope_positions, mrope_delta)`` of a prompt of ``length`` expanded tokens; plain
        positions are M-RoPE positions of shape [3, 0] (see ``multimodal.runner``)."""
        return np.zeros((3, 0), dtype=np.int64), 0

    def expand(
        self, input_ids: Sequence[int], slots: list[int], images: list[PreparedImage]
    ) -> tuple[list[int], list[int]]:
        """The prompt with the placeholder at each of ``slots`` replaced by its image's tokens, and the offset of
        each image's first token."""
        ids: list[int] = []
        offsets: list[int] = []
        start = 0
        for slot, image in zip(slots, images, strict=True):
            ids.extend(input_ids[start:slot])
            offsets.append(len(ids))
            ids.extend([self.image_token_id] * image.num_tokens)
            start = slot + 1
        ids.extend(input_ids[start:])
        return ids, offsets

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
        slots = [i for i, t in enumerate(input_ids) if t == self.placeholder_id]
        if len(slots) != len(images):
            raise InvalidImageError(
                f"{param}: the prompt has {len(slots)} image placeholders for {len(images)} images",
                param=param,
            )
        names = names or [f"{param}[{i}]" for i in range(len(images))]
        decoded = [load_image(image, self.limits, name) for image, name in zip(images, names, strict=True)]
        prepared = self.prepare(decoded)
        ids, offsets = self.expand(input_ids, slots, prepared)
        items = []
        for image, offset in zip(prepared, offsets, strict=True):
            key = hash_pixels(image.pixel_values, image.grid)
            items.append(ImageItem(key, offset, image.num_tokens, image.grid, image.pixel_values))
        positions, delta = self.positions(len(ids), items)
        return ids, MultimodalInputs(items, positions, delta, self.image_token_id, self.whole_images)


class QwenVLProcessor(ImageProcessor):
    """Qwen2-VL's: ``pixel_values`` [patches, channels * temporal_patch * patch * patch] and ``grid`` (t, h, w) in
    patches, as its HF image processor gives them; M-RoPE positions (see the module)."""

    def __init__(self, image_processor: Any, hf_config: Any, limits: ImageLimits | None = None) -> None:
        super().__init__(image_processor, hf_config, limits)
        self.merge_size = int(hf_config.vision_config.spatial_merge_size)

    def prepare(self, images: list[Any]) -> list[PreparedImage]:
        out = self.image_processor(images=images, return_tensors="np")
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        grids = [tuple(int(x) for x in g) for g in np.asarray(out["image_grid_thw"])]
        prepared, patch = [], 0
        for grid in grids:
            n_patches = grid[0] * grid[1] * grid[2]
            values = pixels[patch : patch + n_patches]
            prepared.append(PreparedImage(values, grid, n_patches // self.merge_size**2))
            patch += n_patches
        return prepared

    def positions(self, length: int, images: Sequence[ImageItem]) -> tuple[np.ndarray, int]:
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


class LlavaProcessor(ImageProcessor):
    """LLaVA-NeXT's and LLaVA-OneVision's: ``pixel_values`` [crops, channels, size, size] (the base crop first)
    and ``grid`` ``(crops, height, width)``, the crop count and the image's size in pixels, from which the model
    packs its features (:mod:`sgl_ray.models.llava_anyres`); plain positions. OneVision cuts an image into crops
    only when it is the prompt's one image (several are each given as their base crop, padded square), as its HF
    image processor does."""

    def __init__(self, image_processor: Any, hf_config: Any, limits: ImageLimits | None = None) -> None:
        from sgl_ray.models.llava_anyres import AnyresLayout

        super().__init__(image_processor, hf_config, limits)
        self.layout = AnyresLayout.from_config(hf_config)
        self.crops_one_image_only = hf_config.architectures[0] == "LlavaOnevisionForConditionalGeneration"

    def prepare(self, images: list[Any]) -> list[PreparedImage]:
        if self.crops_one_image_only:  # one prompt of several images: the processor gives their base crops
            out = self.image_processor(images=[images], return_tensors="np")
        else:
            out = self.image_processor(images=images, return_tensors="np")
        prepared = []  # pixel_values: [images, most crops, C, S, S] zero-padded (or per image, unpadded)
        sizes = np.asarray(out["image_sizes"]).tolist()
        for values, (height, width) in zip(out["pixel_values"], sizes, strict=True):
            several = self.crops_one_image_only and len(images) > 1
            crops = 1 if several else self.layout.num_crops(height, width)
            grid = (crops, int(height), int(width))
            tokens = self.layout.num_tokens(height, width, crops)
            pixels = np.array(values[:crops], dtype=np.float32)  # a copy, not a view of the batch
            prepared.append(PreparedImage(pixels, grid, tokens))
        return prepared


class Gemma3VLProcessor(ImageProcessor):
    """Gemma 3's: ``pixel_values`` [1, channels, size, size] per image (resized whole; pan-and-scan crops, which
    transformers' ``Gemma3Processor`` leaves off by default, are not taken) and ``grid`` ``(1, size, size)``;
    ``mm_tokens_per_image`` tokens each and plain positions.

    The prompt holds ``<start_of_image>`` per image; transformers expands it in the *text*
    (``\\n\\n<start_of_image>`` + soft tokens + ``<end_of_image>\\n\\n``) before tokenizing, so the newlines may
    merge with the text next to them. :meth:`expand` does the same on ids: a run of text tokens next to an image
    (up to the nearest added token, where a tokenizer splits its input anyway) is decoded, given its newlines and
    tokenized again; the rest of the prompt keeps its ids."""

    NEWLINES = "\n\n"

    def __init__(
        self, image_processor: Any, hf_config: Any, limits: ImageLimits | None, tokenizer: Any
    ) -> None:
        super().__init__(image_processor, hf_config, limits)
        self.placeholder_id = int(hf_config.boi_token_id)
        self.end_id = int(hf_config.eoi_token_id)
        self.num_tokens = int(hf_config.mm_tokens_per_image)
        self.tokenizer = tokenizer
        self.added_ids = frozenset(int(i) for i in tokenizer.added_tokens_decoder)  # tokenized apart

    @classmethod
    def from_pretrained(
        cls, directory: str, hf_config: Any, limits: ImageLimits | None = None
    ) -> ImageProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(directory)
        return cls(image_processor, hf_config, limits, AutoTokenizer.from_pretrained(directory))

    def prepare(self, images: list[Any]) -> list[PreparedImage]:
        out = self.image_processor(images=images, do_pan_and_scan=False, return_tensors="np")
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)  # [images, C, S, S]
        return [
            PreparedImage(pixels[i : i + 1].copy(), (1, *pixels.shape[2:]), self.num_tokens)
            for i in range(len(images))
        ]

    def expand(
        self, input_ids: Sequence[int], slots: list[int], images: list[PreparedImage]
    ) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        offsets: list[int] = []
        # the text tokens since the last added token, and the newlines where an image meets them
        run: list[int | str] = []

        def flush() -> None:
            if not any(isinstance(x, str) for x in run):
                ids.extend(run)  # type: ignore[arg-type]
            else:
                text, pending = "", []
                for x in run:
                    if isinstance(x, str):
                        text, pending = text + self._decode(pending) + x, []
                    else:
                        pending.append(x)
                text += self._decode(pending)
                ids.extend(self.tokenizer.encode(text, add_special_tokens=False))
            run.clear()

        images_left = iter(images)
        slot_set = set(slots)
        for i, token in enumerate(input_ids):
            if i in slot_set:
                run.append(self.NEWLINES)
                flush()
                offsets.append(len(ids) + 1)
                ids.extend(
                    [self.placeholder_id, *[self.image_token_id] * next(images_left).num_tokens, self.end_id]
                )
                run.append(self.NEWLINES)
            elif token in self.added_ids:
                flush()
                ids.append(token)
            else:
                run.append(token)
        flush()
        return ids, offsets

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# Hugging Face architecture -> the processor of its image inputs
_PROCESSORS: dict[str, type[ImageProcessor]] = {
    "Qwen2VLForConditionalGeneration": QwenVLProcessor,
    "Qwen2_5_VLForConditionalGeneration": QwenVLProcessor,
    "LlavaNextForConditionalGeneration": LlavaProcessor,
    "LlavaOnevisionForConditionalGeneration": LlavaProcessor,
    "Gemma3ForConditionalGeneration": Gemma3VLProcessor,
}


def create_processor(
    hf_config: Any, directory: str, limits: ImageLimits | None = None
) -> ImageProcessor | None:
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
    processor: ImageProcessor | None, token_lists: list[list[int]], image_data: Any, is_batch: bool
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
