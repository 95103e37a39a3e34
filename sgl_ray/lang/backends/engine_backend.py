"""``EngineBackend``: programs against an in-process :class:`sgl_ray.Engine` (no server)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sgl_ray.errors import InvalidRequestError
from sgl_ray.lang.backends.base import DeltaSink, GenResult, Prompt, TokenScoringBackend, join_stream
from sgl_ray.lang.ir import GenParams
from sgl_ray.lang.template import RoleFormat, role_format_from_tokenizer


class EngineBackend(TokenScoringBackend):
    """Run programs on ``engine`` in this process; it needs the engine's tokenizer.

    Example::

        >>> import sgl_ray, sgl_ray.lang as sgl
        >>> sgl.set_default_backend(sgl.EngineBackend(sgl_ray.Engine()))  # doctest: +SKIP
    """

    def __init__(self, engine: Any) -> None:
        if getattr(engine, "tokenizer", None) is None:
            raise InvalidRequestError(
                "EngineBackend needs an engine with a tokenizer (skip_tokenizer_init is set)"
            )
        self.engine = engine
        self._format: RoleFormat | None = None

    def role_format(self) -> RoleFormat:
        if self._format is None:
            self._format = role_format_from_tokenizer(self.engine.tokenizer)
        return self._format

    def generate(self, prompt: Prompt, params: GenParams, on_delta: DeltaSink | None = None) -> GenResult:
        sp = params.to_native()
        if on_delta is None:
            out = self.engine.generate(prompt.text, sp)
            return GenResult(out["text"], out["meta_info"])
        return join_stream(self.engine.generate(prompt.text, sp, stream=True), on_delta)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.engine.tokenizer.encode(t) for t in texts]

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], start: int) -> list[list[float | None]]:
        outs = self.engine.generate(
            input_ids=[list(p) for p in prompts],
            sampling_params={"max_new_tokens": 0, "temperature": 0},
            return_logprob=True,
            logprob_start_len=start,
        )
        return [[lp for lp, *_ in o["meta_info"]["input_token_logprobs"]] for o in outs]

    def cache_prefix(self, text: str) -> None:
        if text:
            self.engine.generate(text, {"max_new_tokens": 0})

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()
