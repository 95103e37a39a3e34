"""Images in programs: ``s += image(x)`` writes the model's image placeholder into the text where it stands and
keeps the image; every later ``gen`` and ``select`` of the state (and of its forks) sends the images of its text.

A backend gets a prompt's images as :class:`ImageRef` values, in text order. The in-process engine reads their
``source`` itself (PIL image, bytes, path, ``data:`` URL). HTTP backends send :attr:`ImageRef.url`: an
``http(s)``/``data:`` URL string as it is, anything else read and encoded here as a ``data:`` URL, so the server
needs no access to the program's files. Chat APIs get each turn that holds images as OpenAI content parts, each
image where it stood (:func:`chat_messages`).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from sgl_ray.errors import InvalidRequestError
from sgl_ray.multimodal.inputs import InvalidImageError

_URL_PREFIXES = ("data:", "http://", "https://")


def check_image_source(source: Any) -> None:
    """Raise :class:`~sgl_ray.multimodal.InvalidImageError` unless ``source`` is a PIL image, non-empty bytes,
    a path or a URL string (what ``image()`` takes)."""
    from PIL import Image

    if isinstance(source, Image.Image) or isinstance(source, os.PathLike):
        return
    if isinstance(source, (bytes, bytearray, memoryview, str)) and len(source):
        return
    kind = (
        "an empty value" if isinstance(source, (bytes, bytearray, memoryview, str)) else type(source).__name__
    )
    raise InvalidImageError(
        f"image(): an image is a PIL image, bytes, a path or a URL, not {kind}", param="image"
    )


@dataclass(frozen=True, eq=False)
class ImageRef:
    """One ``image()`` of a state: its ``source`` and ``turn``, the index of the chat turn it was appended in
    (its position in ``s.messages()``), or None when no turn was open."""

    source: Any
    turn: int | None

    @cached_property
    def url(self) -> str:
        """The image as a URL for a server: URL strings as they are, the rest as a ``data:`` URL (computed once,
        shared by forks)."""
        source = self.source
        if isinstance(source, str) and source.startswith(_URL_PREFIXES):
            return source
        from PIL import Image

        if isinstance(source, Image.Image):
            buffer = io.BytesIO()
            source.save(buffer, format="PNG")
            data = buffer.getvalue()
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:
            data = _read(source)
        return f"data:{_mime(data)};base64,{base64.b64encode(data).decode()}"


def _read(source: str | os.PathLike) -> bytes:
    path = Path(source.removeprefix("file://") if isinstance(source, str) else source).expanduser()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"image: cannot read {str(path)!r}: {exc.strerror}", param="image") from None


def _mime(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
    except Exception:  # PIL raises many kinds for bytes that are no image
        raise InvalidImageError(
            "image: cannot decode the image (not a known image format)", param="image"
        ) from None
    return Image.MIME.get(kind or "", "application/octet-stream")


def turn_images(images: Sequence[ImageRef], num_turns: int) -> list[list[ImageRef]]:
    """The images of each finished turn; an image outside them (appended with no turn open, or in the open turn)
    cannot be sent as chat messages: an :class:`~sgl_ray.errors.InvalidRequestError`."""
    out: list[list[ImageRef]] = [[] for _ in range(num_turns)]
    for image in images:
        if image.turn is None or image.turn >= num_turns:
            raise InvalidRequestError(
                "this gen sends chat messages, and an image() outside a finished turn has no place in them: "
                "append it inside a user turn (s += user(image(...) + 'question'))",
                param="image",
            )
        out[image.turn].append(image)
    return out


def chat_messages(
    messages: Sequence[dict[str, Any]],
    images: Sequence[ImageRef],
    placeholder: str,
    strict: bool = True,
) -> list[dict[str, Any]]:
    """``messages`` (turns whose text holds ``placeholder`` where each image stood) in OpenAI's shape: a turn
    with images gets a list of ``text`` and ``image_url`` parts in their order. ``strict=False`` leaves out the
    images outside the finished turns instead of raising.

    >>> chat_messages([{"role": "user", "content": "Look <image> here"}], [ImageRef("http://x/a.png", 0)], "<image>")
    [{'role': 'user', 'content': [{'type': 'text', 'text': 'Look '}, {'type': 'image_url', 'image_url': {'url': 'http://x/a.png'}}, {'type': 'text', 'text': ' here'}]}]
    """
    if not strict:
        images = [im for im in images if im.turn is not None and im.turn < len(messages)]
    per_turn = turn_images(images, len(messages))
    out = []
    for message, turn in zip(messages, per_turn, strict=True):
        if not turn:
            out.append(message)
            continue
        pieces = message["content"].split(placeholder, len(turn))
        parts: list[dict[str, Any]] = []
        for i, piece in enumerate(pieces):
            if piece:
                parts.append({"type": "text", "text": piece})
            if i < len(turn):
                parts.append({"type": "image_url", "image_url": {"url": turn[i].url}})
        out.append({**message, "content": parts})
    return out
