"""Image inputs: what a caller may pass (PIL images, paths, bytes, ``data:`` and ``http(s)`` URLs), their limits,
and the typed values that carry a preprocessed image from the tokenizer side to the model runner."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from sgl_ray.errors import InvalidRequestError

ImageInput = Any  # PIL.Image.Image | bytes | str (a path, a data: or http(s) URL) | os.PathLike


class InvalidImageError(InvalidRequestError):
    """An image input that cannot be used: undecodable, oversized, of an unknown kind, or too many of them.
    ``param`` names the input (``image_data[1]``, ``messages[0].content[2]``)."""


@dataclass(frozen=True)
class ImageLimits:
    """What one request may bring. Local files (paths, ``file://`` URLs) are read only with
    ``allow_local_files`` and, where ``allowed_local_media_path`` is set, only under it: the in-process ``Engine``
    reads any path, the HTTP ingress none unless started with ``allowed_local_media_path``
    (:meth:`for_server`).

    ``http(s)`` URLs are fetched (:mod:`sgl_ray.multimodal.fetch`) within ``fetch_timeout_s`` in all, redirects
    included, reading at most ``max_image_bytes``; up to ``max_redirects`` redirects are followed, each to an
    ``http(s)`` URL only; with ``allowed_media_domains`` set, every URL (the redirects' too) must be on one of those
    hosts (an empty tuple: no URL is fetched)."""

    max_images: int = 16
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 8192 * 8192
    allow_local_files: bool = True
    allowed_local_media_path: str | None = None
    fetch_timeout_s: float = 5.0
    max_redirects: int = 5
    allowed_media_domains: tuple[str, ...] | None = None

    @classmethod
    def for_server(cls, allowed_local_media_path: str | None = None, **limits: Any) -> ImageLimits:
        return cls(
            allow_local_files=allowed_local_media_path is not None,
            allowed_local_media_path=allowed_local_media_path,
            **limits,
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ImageLimits:
        """The HTTP ingress's limits from the app options :data:`SERVER_OPTIONS` (absent or None: the default);
        :class:`~sgl_ray.errors.InvalidRequestError` naming the option for a bad value.

        >>> ImageLimits.from_options({"image_fetch_timeout_s": 2, "allowed_media_domains": ["example.com"]})
        ... # doctest: +ELLIPSIS
        ImageLimits(..., fetch_timeout_s=2.0, max_redirects=5, allowed_media_domains=('example.com',))
        """
        limits: dict[str, Any] = {}
        for option, (field, parse, want) in SERVER_OPTIONS.items():
            value = options.get(option)
            if value is None:
                continue
            parsed = parse(value)
            if parsed is None:
                raise InvalidRequestError(f"{option} must be {want}, got {value!r}", param=option)
            limits[field] = parsed
        return cls.for_server(options.get("allowed_local_media_path"), **limits)


def _integer(least: int) -> Callable[[Any], int | None]:
    return lambda v: v if isinstance(v, int) and not isinstance(v, bool) and v >= least else None


def _seconds(v: Any) -> float | None:
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    return float(v) if number and 0 < v < math.inf else None


def _hosts(v: Any) -> tuple[str, ...] | None:
    ok = isinstance(v, (list, tuple)) and all(isinstance(h, str) and h for h in v)
    return tuple(h.lower() for h in v) if ok else None


# app option -> (ImageLimits field, its parser (None: a bad value), what it must be)
SERVER_OPTIONS: dict[str, tuple[str, Callable[[Any], Any], str]] = {
    "max_images_per_prompt": ("max_images", _integer(1), "an integer >= 1"),
    "max_image_bytes": ("max_image_bytes", _integer(1), "an integer >= 1"),
    "image_fetch_timeout_s": ("fetch_timeout_s", _seconds, "a number > 0"),
    "image_fetch_max_redirects": ("max_redirects", _integer(0), "an integer >= 0"),
    "allowed_media_domains": ("allowed_media_domains", _hosts, "a list of host names"),
}


class ImageItem(msgspec.Struct, frozen=True):
    """One preprocessed image of a prompt: its placeholder tokens are ``prompt[offset : offset + num_tokens]``.

    ``pixel_values`` [patches, channels * temporal_patch * patch * patch] float32 and ``grid_thw`` (t, h, w in
    patches) are the HF image processor's output; ``hash`` identifies the image for the prefix cache and the
    runner's embedding cache."""

    hash: int
    offset: int
    num_tokens: int
    grid_thw: tuple[int, int, int]
    pixel_values: np.ndarray


class MultimodalInputs(msgspec.Struct, frozen=True):
    """A prompt's images and its M-RoPE positions.

    ``mrope_positions`` [3, prompt_len] (temporal, height, width) for the prompt's tokens; a token at position
    ``p >= prompt_len`` (generated) has all three at ``p + mrope_delta``. ``keyed_ids`` is the prompt as the
    scheduler and its radix cache see it: each image's placeholder ids replaced by one id derived from its hash
    (:func:`image_key_id`), so equal images share KV and different ones never do; the model embeds those rows
    from the image instead. ``whole_images``: the model attends in both directions within each image (Gemma 3),
    so a prefill chunk must not end inside one (the scheduler moves the chunk's end to an image's edge)."""

    images: list[ImageItem]
    mrope_positions: np.ndarray
    mrope_delta: int
    placeholder_id: int
    whole_images: bool = False

    def chunk_end(self, start: int, end: int) -> int:
        """A prefill chunk over positions ``start .. end`` moved so that it ends at no image's inside: back to
        the start of the image it would cut, or, when that image starts at or before ``start`` (a chunk budget
        smaller than the image), on to its end."""
        if not self.whole_images:
            return end
        for image in self.images:
            lo, hi = image.offset, image.offset + image.num_tokens
            if lo < end < hi:
                return lo if lo > start else hi
        return end

    def keyed_ids(self, input_ids: list[int], vocab_size: int) -> list[int]:
        ids = list(input_ids)
        for image in self.images:
            key = image_key_id(image.hash, vocab_size)
            ids[image.offset : image.offset + image.num_tokens] = [key] * image.num_tokens
        return ids

    def owned(self) -> MultimodalInputs:
        """These inputs with every array this process does not own (read-only: deserialized in place from a
        Ray compiled-graph channel's shared-memory buffer) copied: the runner keeps a request's inputs for its
        lifetime, and a kept view would hold the channel's buffer and stall the writer (see
        ``sgl_ray.actors.shard_worker.owned``)."""

        def own(a: np.ndarray) -> np.ndarray:
            return a if a.flags.writeable else a.copy()

        images = [msgspec.structs.replace(im, pixel_values=own(im.pixel_values)) for im in self.images]
        return msgspec.structs.replace(self, images=images, mrope_positions=own(self.mrope_positions))

    def real_ids(self, keyed: list[int]) -> list[int]:
        """``keyed_ids`` back to the tokens the model's vocabulary has (for penalties and logprob targets)."""
        ids = list(keyed)
        for image in self.images:
            ids[image.offset : image.offset + image.num_tokens] = [self.placeholder_id] * image.num_tokens
        return ids


def image_key_id(image_hash: int, vocab_size: int) -> int:
    """A token id outside the vocabulary (``[vocab_size, 2**31 - 1)``) standing for an image in the radix key."""
    return vocab_size + image_hash % (2**31 - 1 - vocab_size)


def hash_pixels(pixel_values: np.ndarray, grid_thw: tuple[int, int, int]) -> int:
    """A 63-bit digest of the preprocessed image (so it keys what the model sees, whatever the input format)."""
    digest = hashlib.blake2b(np.ascontiguousarray(pixel_values).tobytes(), digest_size=8)
    digest.update(np.asarray(grid_thw, dtype=np.int64).tobytes())
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def load_image(item: ImageInput, limits: ImageLimits, param: str) -> Any:
    """A decoded RGB ``PIL.Image`` from one input, or :class:`InvalidImageError` naming ``param``.

    Example::

        >>> from PIL import Image
        >>> load_image(Image.new("RGB", (4, 4)), ImageLimits(), "image_data").size
        (4, 4)
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        image = item
    else:
        data = _image_bytes(item, limits, param)
        if len(data) > limits.max_image_bytes:
            raise InvalidImageError(
                f"{param}: the image is {len(data)} bytes, over the limit of {limits.max_image_bytes}",
                param=param,
            )
        try:
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size, limits, param)
            image.load()
        except InvalidImageError:
            raise
        except Exception as exc:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            why = "not a known image format" if isinstance(exc, UnidentifiedImageError) else f"{exc}"
            raise InvalidImageError(f"{param}: cannot decode the image ({why})", param=param) from None
    _check_pixels(image.size, limits, param)
    return image.convert("RGB") if image.mode != "RGB" else image


def _check_pixels(size: tuple[int, int], limits: ImageLimits, param: str) -> None:
    w, h = size
    if w < 1 or h < 1 or w * h > limits.max_image_pixels:
        raise InvalidImageError(
            f"{param}: the image is {w}x{h} pixels (limit {limits.max_image_pixels} pixels)", param=param
        )


def _image_bytes(item: ImageInput, limits: ImageLimits, param: str) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str) and item.startswith("data:"):
        return decode_data_url(item, param)
    if is_http_url(item):
        from sgl_ray.multimodal.fetch import fetch_image_blocking

        return fetch_image_blocking(item, limits, param)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        if isinstance(item, str) and item.startswith("file://"):
            path = Path(item.removeprefix("file://"))
        _check_local_path(path, limits, param)
        try:
            size = path.stat().st_size
            if size > limits.max_image_bytes:
                raise InvalidImageError(
                    f"{param}: the image is {size} bytes, over the limit of {limits.max_image_bytes}",
                    param=param,
                )
            return path.read_bytes()
        except OSError as exc:
            raise InvalidImageError(
                f"{param}: cannot read {str(path)!r}: {exc.strerror}", param=param
            ) from None
    raise InvalidImageError(
        f"{param}: an image must be a PIL image, bytes, a path, a data: or http(s) URL, not {type(item).__name__}",
        param=param,
    )


def _check_local_path(path: Path, limits: ImageLimits, param: str) -> None:
    if not limits.allow_local_files:
        raise InvalidImageError(
            f"{param}: local files are not read here (the server's allowed_local_media_path is not set)",
            param=param,
        )
    root = limits.allowed_local_media_path
    if root is None:
        return
    resolved, allowed = path.resolve(), Path(root).resolve()
    if not resolved.is_relative_to(allowed):
        raise InvalidImageError(
            f"{param}: local files are only read under the allowed media path", param=param
        )


def is_http_url(item: Any) -> bool:
    """Whether ``item`` is an ``http://`` or ``https://`` URL (the scheme in any case)."""
    return isinstance(item, str) and item[:8].lower().startswith(("http://", "https://"))


def decode_data_url(url: str, param: str) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URL (base64 only: images are binary)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidImageError(
            f"{param}: a data: URL must be base64 (data:image/png;base64,...)", param=param
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError(f"{param}: the data: URL is not valid base64", param=param) from None
