"""``OpenAI``: programs against any OpenAI-compatible server, through the official ``openai`` client."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sgl_ray.errors import UnsupportedFeatureError
from sgl_ray.function_call import ToolCall
from sgl_ray.lang.backends.base import Backend, DeltaSink, GenResult, Prompt, require_assistant_turn
from sgl_ray.lang.backends.http import error_from_body
from sgl_ray.lang.images import ImageRef, chat_messages
from sgl_ray.lang.ir import GenParams, GenTools
from sgl_ray.lang.template import RoleFormat

_NATIVE_ONLY = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_new_tokens",
    "ignore_eos",
    "regex",
    "stop_token_ids",
)


class OpenAI(Backend):
    """An OpenAI-compatible server.

    - Chat models (``is_chat_model=True``, the default) generate through ``chat.completions``: the state's
      finished turns become ``messages`` and ``gen`` must open an assistant turn. ``select`` needs prompt
      logprobs, which chat APIs do not return, so it raises :class:`~sgl_ray.errors.UnsupportedFeatureError`.
    - Completion models generate through ``completions`` on the state's text (roles written with
      ``role_format``, default :meth:`RoleFormat.plain`); ``select`` scores choices with ``echo`` + ``logprobs``
      and ``max_tokens=0`` (our server supports it; servers that do not answer with an error).

    Parameters outside the OpenAI API (``top_k``, ``min_p``, ``regex``, …) go in ``extra_body``;
    ``json_schema`` becomes ``response_format``. A ``gen`` with ``tools`` (chat models only) passes ``tools`` and
    ``tool_choice`` through and returns the server's ``tool_calls``. ``image()`` (chat models) sends each turn
    that holds images as ``text`` and ``image_url`` parts (``data:`` URLs, or the ``http(s)`` URL given).

    Example::

        >>> import sgl_ray.lang as sgl
        >>> backend = sgl.OpenAI("smollm2", base_url="http://127.0.0.1:8000/v1", api_key="unused")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        is_chat_model: bool = True,
        role_format: RoleFormat | None = None,
        **client_kwargs: Any,
    ) -> None:
        import openai  # the official client: `pip install openai`

        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "unused", **client_kwargs)
        self.model = model
        self.is_chat_model = is_chat_model
        self._format = role_format or RoleFormat.plain()

    def role_format(self) -> RoleFormat:
        return self._format

    def image_token(self) -> str:
        """Chat models: the role format's image token, else ``<image>`` — only a marker in the state's text, the
        server places the image (an ``image_url`` part). Completion requests take no images."""
        if not self.is_chat_model:
            raise UnsupportedFeatureError(
                "image() needs a chat model: completions take no images (OpenAI(..., is_chat_model=True))",
                param="image",
            )
        return self._format.image_token or "<image>"

    def _kwargs(self, params: GenParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model}
        for ours, theirs in (
            ("max_new_tokens", "max_tokens"),
            ("stop", "stop"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("frequency_penalty", "frequency_penalty"),
            ("presence_penalty", "presence_penalty"),
            ("seed", "seed"),
        ):
            if (v := getattr(params, ours)) is not None:
                kw[theirs] = v
        extra = {k: getattr(params, k) for k in _NATIVE_ONLY if getattr(params, k) is not None}
        if "min_new_tokens" in extra:
            extra["min_tokens"] = extra.pop("min_new_tokens")
        if extra:
            kw["extra_body"] = extra
        if params.json_schema is not None:
            schema = {"name": "output", "schema": json.loads(params.json_schema)}
            kw["response_format"] = {"type": "json_schema", "json_schema": schema}
        return kw

    def _call(self, fn, **kw):
        """Call the client; its HTTP errors become typed :mod:`sgl_ray.errors` exceptions."""
        try:
            return fn(**kw)
        except self._openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {"message": str(e)}  # the client unwraps "error"
            raise error_from_body(e.status_code, body if "error" in body else {"error": body}) from None

    def generate(
        self,
        prompt: Prompt,
        params: GenParams,
        on_delta: DeltaSink | None = None,
        tools: GenTools | None = None,
    ) -> GenResult:
        kw = self._kwargs(params)
        stream = on_delta is not None
        if tools is not None:
            if not self.is_chat_model:
                raise UnsupportedFeatureError(
                    "gen(tools=...) needs a chat model: OpenAI(..., is_chat_model=True)", param="tools"
                )
            kw["tools"] = list(tools.tools)
            if tools.choice is not None:
                kw["tool_choice"] = tools.choice
        if self.is_chat_model:
            require_assistant_turn(prompt, "with a chat model")
            kw["messages"] = prompt.messages
            if prompt.images:
                kw["messages"] = chat_messages(prompt.messages, prompt.images, self.image_token())
            fn = self.client.chat.completions.create
        else:
            kw["prompt"] = prompt.text
            fn = self.client.completions.create
        if not stream:
            r = self._call(fn, **kw)
            choice = r.choices[0]
            text = choice.message.content if self.is_chat_model else choice.text
            calls = None
            if tools is not None:
                calls = [
                    ToolCall(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []
                ]
            return GenResult(text or "", _meta(r.usage, choice.finish_reason), calls)
        text, finish, usage = "", None, None
        pieces: dict[int, list[str]] = {}  # call index → [name, arguments]
        for chunk in self._call(fn, stream=True, stream_options={"include_usage": True}, **kw):
            usage = chunk.usage or usage
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            delta = (c.delta.content if self.is_chat_model else c.text) or ""
            if delta:
                on_delta(delta)
                text += delta
            for piece in (c.delta.tool_calls or []) if self.is_chat_model else []:
                call = pieces.setdefault(piece.index, ["", ""])
                call[0] = (piece.function.name if piece.function else None) or call[0]
                call[1] += (piece.function.arguments if piece.function else None) or ""
            finish = c.finish_reason or finish
        calls = [ToolCall(*pieces[i]) for i in sorted(pieces)] if tools is not None else None
        return GenResult(text, _meta(usage, finish), calls)

    def choice_logprobs(
        self, context: str, choices: Sequence[str], images: Sequence[ImageRef] = ()
    ) -> list[list[float]]:
        if self.is_chat_model:
            raise UnsupportedFeatureError(
                "select() needs prompt logprobs, which chat completions do not return: use "
                "OpenAI(..., is_chat_model=False) on a server whose completions support echo + logprobs, or "
                "RuntimeEndpoint",
                param="choices",
            )
        r = self._call(
            self.client.completions.create,
            model=self.model,
            prompt=[context + c for c in choices],
            max_tokens=0,
            echo=True,
            logprobs=1,
        )
        out: list[list[float]] = [[] for _ in choices]
        for choice in r.choices:
            lp = choice.logprobs
            offsets = [*lp.text_offset, len(context) + len(choices[choice.index]) + 1]
            # A token belongs to the choice if it ends past the context (a merged boundary token is re-scored).
            out[choice.index] = [
                v for i, v in enumerate(lp.token_logprobs) if v is not None and offsets[i + 1] > len(context)
            ]
        return out


def _meta(usage: Any, finish_reason: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"finish_reason": finish_reason}
    if usage is not None:
        meta["prompt_tokens"] = usage.prompt_tokens
        meta["completion_tokens"] = usage.completion_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        meta["cached_tokens"] = getattr(details, "cached_tokens", 0) if details else 0
    return meta
