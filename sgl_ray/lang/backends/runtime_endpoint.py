"""``RuntimeEndpoint``: programs against our server's native ``/generate`` (or any sgl_ray server URL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sgl_ray.errors import RemoteError
from sgl_ray.function_call import ToolCall
from sgl_ray.lang.backends.base import (
    DeltaSink,
    GenResult,
    Prompt,
    TokenScoringBackend,
    join_stream,
    require_assistant_turn,
)
from sgl_ray.lang.backends.http import JSONClient
from sgl_ray.lang.images import ImageRef, chat_messages
from sgl_ray.lang.ir import GenParams, GenTools
from sgl_ray.lang.template import RoleFormat

_CHAT_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class RuntimeEndpoint(TokenScoringBackend):
    """A running ``sgl-ray serve`` (or any deployment of ``build_openai_app``).

    The chat template comes from ``GET /get_model_info``; ``gen`` posts the state's text to ``/generate``;
    ``select`` tokenizes through ``/tokenize`` and scores all choices in one ``/generate`` call with prompt
    logprobs and ``max_new_tokens=0``. Forks share their prefix through the server's radix cache
    (``s.get_meta_info(name)["cached_tokens"]``). A ``gen`` with ``tools`` posts the turns to the server's
    ``/v1/chat/completions`` instead, which renders, constrains and parses the calls. Images go as ``data:``
    URLs in ``image_data`` (``http(s)`` URLs as they are), or as ``image_url`` parts to the chat endpoint.

    Example::

        >>> import sgl_ray.lang as sgl
        >>> sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:8000"))  # doctest: +SKIP
    """

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0
    ):
        self.client = JSONClient(base_url, api_key, timeout)
        self._format: RoleFormat | None = None
        self._info: dict[str, Any] | None = None

    def get_model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self.client.get("/get_model_info")
        return self._info

    def role_format(self) -> RoleFormat:
        if self._format is None:
            self._format = RoleFormat.from_dict(self.get_model_info()["role_format"])
        return self._format

    def generate(
        self,
        prompt: Prompt,
        params: GenParams,
        on_delta: DeltaSink | None = None,
        tools: GenTools | None = None,
    ) -> GenResult:
        if tools is not None:
            return self._chat_with_tools(prompt, params, tools, on_delta)
        body = {"text": prompt.text, "sampling_params": params.to_native(), "stream": on_delta is not None}
        if prompt.images:
            body["image_data"] = [image.url for image in prompt.images]
        if on_delta is None:
            out = self.client.post("/generate", body)
            return GenResult(out["text"], out["meta_info"])
        return join_stream(self.client.stream("/generate", body), on_delta)

    def _chat_with_tools(
        self, prompt: Prompt, params: GenParams, tools: GenTools, on_delta: DeltaSink | None
    ) -> GenResult:
        require_assistant_turn(prompt, "with tools")
        # the chat endpoint takes the native extras (top_k, regex, ignore_eos, …) under the same names
        body: dict[str, Any] = {_CHAT_NAMES.get(k, k): v for k, v in params.to_native().items()}
        messages = prompt.messages
        if prompt.images:
            messages = chat_messages(messages, prompt.images, self.image_token())
        body.update(messages=messages, tools=list(tools.tools))
        if tools.choice is not None:
            body["tool_choice"] = tools.choice
        r = self.client.post("/v1/chat/completions", body)
        choice, usage = r["choices"][0], r["usage"]
        message = choice["message"]
        calls = [
            ToolCall(c["function"]["name"], c["function"]["arguments"])
            for c in message.get("tool_calls") or []
        ]
        text = message.get("content") or ""
        if on_delta is not None and text:
            on_delta(text)
        meta = {
            "finish_reason": choice["finish_reason"],
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        }
        return GenResult(text, meta, calls)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.client.post("/tokenize", {"text": list(texts)})["tokens"]

    def prompt_logprobs(
        self, prompts: Sequence[Sequence[int]], start: int, images: Sequence[ImageRef] = ()
    ) -> list[list[float | None]]:
        body: dict[str, Any] = {
            "input_ids": [list(p) for p in prompts],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": start,
        }
        if images:
            body["image_data"] = [[image.url for image in images]] * len(prompts)
        outs = self.client.post("/generate", body)
        return [[lp for lp, *_ in o["meta_info"]["input_token_logprobs"]] for o in outs]

    def cache_prefix(self, text: str, images: Sequence[ImageRef] = ()) -> None:
        if text:
            body: dict[str, Any] = {"text": text, "sampling_params": {"max_new_tokens": 0}}
            if images:
                body["image_data"] = [image.url for image in images]
            self.client.post("/generate", body)

    def flush_cache(self) -> bool:
        try:
            return bool(self.client.post("/flush_cache", {}).get("success"))
        except RemoteError as e:
            if e.status_code == 409:  # requests are running
                return False
            raise
