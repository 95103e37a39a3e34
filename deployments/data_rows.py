"""One Ray Data row → what the engine gets: its prefix sort key, prompt token ids, sampling parameters and tools.

Rows come out of Arrow: dicts are structs there, and keys that only some rows have come back as None, so every
reader here drops None values again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from sgl_ray.errors import InvalidRequestError


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


def prompt_ids(tokenizer: Any, row: Mapping[str, Any], apply_chat_template: bool) -> list[int]:
    """The prompt of one row: its ``input_ids``, else its ``messages`` under the chat template, else its
    ``prompt`` text (tokenized as ``Engine.generate(prompt=...)`` would)."""
    ids = row.get("input_ids")
    if ids is not None:
        return [int(t) for t in ids]
    messages = row.get("messages")
    if messages is not None:
        if not apply_chat_template:
            raise InvalidRequestError(
                "rows with `messages` need ProcessorConfig(apply_chat_template=True)", param="messages"
            )
        from sgl_ray.protocol.chat_template import render_chat

        # Arrow fills keys missing from some messages with None: drop them again.
        return render_chat(tokenizer, [{k: v for k, v in dict(m).items() if v is not None} for m in messages])
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
