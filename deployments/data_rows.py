"""One Ray Data row → what the engine gets: its prefix sort key, prompt token ids, images, sampling parameters and
tools; and a failed row's error, which names the row. Also the two small stages that run in Ray Data tasks around the
engine (the window sort and the postprocess wrapper): this module imports no torch and no Ray, so the workers
that run them start fast.

Rows come out of Arrow: dicts are structs there, and keys that only some rows have come back as None, so every
reader here drops None values again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from sgl_ray.errors import InvalidRequestError, SglRayError
from sgl_ray.multimodal.inputs import InvalidImageError

if TYPE_CHECKING:
    import pyarrow as pa

IMAGE_COLUMN = "image"  # Ray Data LLM's: the images of a `prompt` or `input_ids` row
PROMPT_KEY = "__sgl_prompt_key"  # internal column of older pipelines: dropped by the engine stage if present
ERROR_COLUMN = "__inference_error__"  # Ray Data LLM's name: "" for a good row, the error for a failed one
_PROMPT_COLUMNS = ("prompt", "messages", "input_ids")
_INTERNAL_COLUMNS = (*_PROMPT_COLUMNS, "sampling_params", "tools", "tool_choice", PROMPT_KEY, ERROR_COLUMN)


class RowError(SglRayError):
    """One row of a Ray Data job failed; the message names the row (its short columns and the start of its
    prompt) and the error. The original error is the ``__cause__`` (where it survives pickling)."""

    @classmethod
    def of(cls, row: str, error: BaseException) -> RowError:
        e = cls(f"{row}: {type(error).__name__}: {error}")
        e.status_code = getattr(error, "status_code", cls.status_code)
        e.error_type = getattr(error, "error_type", cls.error_type)
        return e


def describe_row(row: Mapping[str, Any], width: int = 40) -> str:
    """A row as an error message names it: its short scalar columns (ids, names; at most four) and the start of
    its prompt.

    >>> describe_row({"id": 7, "prompt": "Tell me about the history of the Roman Empire in detail."})
    "row {'id': 7} (prompt 'Tell me about the history of the Roman …)"
    >>> describe_row({"messages": [{"role": "user", "content": "Hi"}], "sampling_params": {"top_k": -5}})
    "row (messages [{'role': 'user', 'content': 'Hi'}])"
    """
    scalars = {
        k: v
        for k, v in row.items()
        if k not in _INTERNAL_COLUMNS and isinstance(v, (int, float, str, bool)) and len(str(v)) <= width
    }
    shown = dict(list(scalars.items())[:4])
    head = f"row {shown}" if shown else "row"
    for name in _PROMPT_COLUMNS:
        value = row.get(name)
        if value is not None:
            text = repr(value) if isinstance(value, str) else str(without_nulls(value))
            return f"{head} ({name} {text[:width] + '…' if len(text) > width else text})"
    return f"{head} (no prompt, messages or input_ids)"


def prompt_key(row: Mapping[str, Any]) -> bytes:
    """A sort key under which rows whose prompts share a prefix sit together, computed without a tokenizer:
    ``input_ids`` as big-endian ``uint32`` bytes (byte order is token order), ``messages`` as their roles and
    contents, ``prompt`` as UTF-8 (byte order is code-point order, so a shared text prefix is a shared key prefix).

    >>> k = [prompt_key({"prompt": p}) for p in ("System: be brief. Q1", "Hello", "System: be brief. Q2")]
    >>> sorted(k) == [k[1], k[0], k[2]]
    True
    >>> prompt_key({"input_ids": [1, 2]}) < prompt_key({"input_ids": [1, 2, 0]}) < prompt_key({"input_ids": [256]})
    True
    """
    ids = row.get("input_ids")
    if ids is not None:
        return np.asarray(ids, dtype=">u4").tobytes()
    messages = row.get("messages")
    if messages is not None:
        return b"".join(f"{m.get('role')}\x1e{_content_key(m.get('content'))}\x1f".encode() for m in messages)
    return str(row.get("prompt", "")).encode()


def _content_key(content: Any) -> str:
    """A message's content for the sort key: its text, each image part a separator (not its pixels)."""
    if not isinstance(content, (list, tuple)):
        return str(content)
    return "".join(
        str(p.get("text") or "") if p.get("type") == "text" else "\x1d" for p in content if p is not None
    )


def sort_window(batch: pa.Table) -> pa.Table:
    """One window of rows, sorted by :func:`prompt_key` (a stable sort: equal prompts keep their order)."""
    columns = [c for c in _PROMPT_COLUMNS if c in batch.column_names]
    keys = [prompt_key(r) for r in batch.select(columns).to_pylist()]
    return batch.take(sorted(range(len(keys)), key=keys.__getitem__))


class Postprocess:
    """The user's ``postprocess``; with the error column, failed rows (``__inference_error__`` set) skip it and
    good rows keep the column, as in Ray Data LLM."""

    def __init__(self, postprocess: Callable[[dict[str, Any]], dict[str, Any]], error_column: bool) -> None:
        self.postprocess = postprocess
        self.error_column = error_column

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if not self.error_column:
            return self.postprocess(row)
        if row.get(ERROR_COLUMN):
            return row
        return {**self.postprocess(row), ERROR_COLUMN: ""}


def prompt_ids(
    tokenizer: Any,
    row: Mapping[str, Any],
    apply_chat_template: bool,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """The prompt of one row: its ``input_ids``, else its ``messages`` under the chat template, else its
    ``prompt`` text (tokenized as ``Engine.generate(prompt=...)`` would)."""
    ids = row.get("input_ids")
    if ids is not None:
        return [int(t) for t in ids]
    messages = row.get("messages")
    if messages is not None:
        if not apply_chat_template:
            raise InvalidRequestError(
                "rows with `messages` need the chat template (apply_chat_template=True)", param="messages"
            )
        from sgl_ray.protocol.chat_template import render_chat

        # Arrow fills keys missing from some messages with None: drop them again.
        return render_chat(
            tokenizer,
            [{k: v for k, v in dict(m).items() if v is not None} for m in messages],
            template_kwargs=template_kwargs,
        )
    prompt = row.get("prompt")
    if prompt is None:
        raise InvalidRequestError(
            "each row needs `prompt`, `messages` or `input_ids` (set them in preprocess)"
        )
    return tokenizer.encode(str(prompt))


def without_nulls(value: Any) -> Any:
    """Arrow turns dicts into structs and fills the keys some rows lack with None: drop them again."""
    if isinstance(value, Mapping):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [without_nulls(v) for v in value]
    return value


def row_tools(row: Mapping[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    """A row's ``tools`` (a list, or its JSON text, which keeps schemas exact through Arrow) and ``tool_choice``."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"tools: not valid JSON: {e}", param="tools") from None
    elif tools is not None:
        tools = without_nulls(list(tools))
    choice = row.get("tool_choice")
    return tools or None, without_nulls(choice) if isinstance(choice, Mapping) else choice


def sampling_params(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """A row's ``sampling_params`` as plain Python values (Arrow gives absent keys as None: dropped)."""
    out = {k: v for k, v in dict(value or {}).items() if v is not None}
    if out.get("n", 1) != 1:
        raise InvalidRequestError(
            "the Ray Data processor returns one completion per row: n must be 1", param="n"
        )
    return out


_IMAGE_PARTS = {"image": "image", "image_url": "image_url", "image_pil": "image_pil"}  # part type -> its key


def split_images(row: Mapping[str, Any], placeholder: str | None) -> tuple[Mapping[str, Any], list[Any]]:
    """``(row, images)``: a ``messages`` row's image parts (Ray Data LLM's ``{"type": "image", "image": ...}``,
    OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``, vLLM's ``image_pil``) become the model's image
    ``placeholder`` in the message text, as ``/v1/chat/completions`` renders them (parts joined with newlines); a
    ``prompt`` or ``input_ids`` row takes its images from the ``image`` column (one image or a list), its prompt
    holding one placeholder per image. Images stay as given (PIL images, bytes, paths, ``data:`` URLs) but for
    arrays (``ray.data.read_images``), which become PIL images, and ``{"bytes", "path"}`` structs (Hugging Face
    datasets), which become their bytes or path; the engine's image processor reads and checks them.

    >>> row, images = split_images(
    ...     {"messages": [{"role": "user", "content": [{"type": "image", "image": b"PNG"}, {"type": "text", "text": "Hi"}]}]},
    ...     "<image>",
    ... )
    >>> row["messages"], images
    ([{'role': 'user', 'content': '<image>\\nHi'}], [b'PNG'])
    """
    column = row.get(IMAGE_COLUMN)
    given = [] if column is None else list(column) if isinstance(column, (list, tuple)) else [column]
    messages = row.get("messages")
    if messages is None or not given and not any(_has_parts(m) for m in messages):
        return row, [_image_input(image, f"{IMAGE_COLUMN}[{i}]") for i, image in enumerate(given)]
    if given:
        raise InvalidRequestError(
            "a `messages` row takes its images as content parts ({'type': 'image', 'image': ...}), "
            "not in the `image` column",
            param=IMAGE_COLUMN,
        )
    images: list[Any] = []
    out = []
    for i, message in enumerate(messages):
        message = {k: v for k, v in dict(message).items() if v is not None}
        if _has_parts(message):
            texts = []
            for j, part in enumerate(message["content"]):
                part, name = without_nulls(dict(part)), f"messages[{i}].content[{j}]"
                kind = part.get("type")
                if kind == "text":
                    texts.append(str(part.get("text") or ""))
                elif kind in _IMAGE_PARTS:
                    if placeholder is None:
                        raise InvalidImageError(f"{name}: this model takes no image inputs", param=name)
                    images.append(_image_input(_part_image(part, kind, name), name))
                    texts.append(placeholder)
                else:
                    raise InvalidRequestError(
                        f"{name}: content part type {kind!r} is not supported (text, image, image_url)",
                        param=name,
                    )
            message["content"] = "\n".join(texts)
        out.append(message)
    return {**row, "messages": out}, images


def _has_parts(message: Mapping[str, Any]) -> bool:
    return isinstance(message.get("content"), (list, tuple))


def _part_image(part: Mapping[str, Any], kind: str, name: str) -> Any:
    value = part.get(_IMAGE_PARTS[kind])
    if kind == "image_url" and isinstance(value, Mapping):
        value = value.get("url")
    if value is None:
        raise InvalidImageError(f"{name}: an {kind} part needs its {_IMAGE_PARTS[kind]}", param=name)
    return value


def _image_input(value: Any, name: str) -> Any:
    """An image as the engine's processor reads it: arrays as PIL images, ``{"bytes", "path"}`` as one of those."""
    if isinstance(value, np.ndarray):
        from PIL import Image

        try:
            return Image.fromarray(value)
        except (TypeError, ValueError) as e:
            raise InvalidImageError(
                f"{name}: an array of shape {value.shape} is not an image ({e})", param=name
            ) from None
    if isinstance(value, Mapping):
        found = value.get("bytes") or value.get("path")
        if found is None:
            raise InvalidImageError(f"{name}: an image struct needs `bytes` or `path`", param=name)
        return found
    return value
