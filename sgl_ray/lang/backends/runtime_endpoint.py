"""``RuntimeEndpoint``: programs against our server's native ``/generate`` (or any sgl_ray server URL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sgl_ray.errors import RemoteError
from sgl_ray.lang.backends.base import DeltaSink, GenResult, Prompt, TokenScoringBackend, join_stream
from sgl_ray.lang.backends.http import JSONClient
from sgl_ray.lang.ir import GenParams
from sgl_ray.lang.template import RoleFormat


class RuntimeEndpoint(TokenScoringBackend):
    """A running ``sgl-ray serve`` (or any deployment of ``build_openai_app``).

    The chat template comes from ``GET /get_model_info``; ``gen`` posts the state's text to ``/generate``;
    ``select`` tokenizes through ``/tokenize`` and scores all choices in one ``/generate`` call with prompt
    logprobs and ``max_new_tokens=0``. Forks share their prefix through the server's radix cache
    (``s.get_meta_info(name)["cached_tokens"]``).

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

    def generate(self, prompt: Prompt, params: GenParams, on_delta: DeltaSink | None = None) -> GenResult:
        body = {"text": prompt.text, "sampling_params": params.to_native(), "stream": on_delta is not None}
        if on_delta is None:
            out = self.client.post("/generate", body)
            return GenResult(out["text"], out["meta_info"])
        return join_stream(self.client.stream("/generate", body), on_delta)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.client.post("/tokenize", {"text": list(texts)})["tokens"]

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], start: int) -> list[list[float | None]]:
        body = {
            "input_ids": [list(p) for p in prompts],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": start,
        }
        outs = self.client.post("/generate", body)
        return [[lp for lp, *_ in o["meta_info"]["input_token_logprobs"]] for o in outs]

    def cache_prefix(self, text: str) -> None:
        if text:
            self.client.post("/generate", {"text": text, "sampling_params": {"max_new_tokens": 0}})

    def flush_cache(self) -> bool:
        try:
            return bool(self.client.post("/flush_cache", {}).get("success"))
        except RemoteError as e:
            if e.status_code == 409:  # requests are running
                return False
            raise
