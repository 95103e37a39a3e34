"""One Ray Data row → what the engine gets: its prefix sort key, prompt token ids, sampling parameters and tools;
and a failed row's error, which names the row. Also the two small stages that run in Ray Data tasks around the
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

if TYPE_CHECKING:
    import pyarrow as pa

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
        return b"".join(f"{m.get('role')}\x1e{m.get('content')}\x1f".encode() for m in messages)
    return str(row.get("prompt", "")).encode()


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
