"""``EngineBackend``: programs against an in-process :class:`sgl_ray.Engine` (no server)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sgl_ray.errors import InvalidRequestError
from sgl_ray.lang.backends.base import (
    DeltaSink,
    GenResult,
    Prompt,
    TokenScoringBackend,
    join_stream,
    require_assistant_turn,
)
from sgl_ray.lang.images import ImageRef, turn_images
from sgl_ray.lang.ir import GenParams, GenTools
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
        self._tool_format: Any = None  # the engine's ToolFormat, on first use

    def role_format(self) -> RoleFormat:
        if self._format is None:
            self._format = role_format_from_tokenizer(
                self.engine.tokenizer, getattr(self.engine, "hf_config", None)
            )
        return self._format

    def generate(
        self,
        prompt: Prompt,
        params: GenParams,
        on_delta: DeltaSink | None = None,
        tools: GenTools | None = None,
    ) -> GenResult:
        if tools is not None:
            return self._generate_with_tools(prompt, params, tools, on_delta)
        sp = params.to_native()
        images = _sources(prompt.images)
        if on_delta is None:
            out = self.engine.generate(prompt.text, sp, image_data=images)
            return GenResult(out["text"], out["meta_info"])
        return join_stream(self.engine.generate(prompt.text, sp, stream=True, image_data=images), on_delta)

    def _generate_with_tools(
        self, prompt: Prompt, params: GenParams, tools: GenTools, on_delta: DeltaSink | None
    ) -> GenResult:
        """The chat path in process: the turns rendered with the chat template and the tools, the call format
        forced for ``required`` or a named function, the output parsed with the engine's tool-call parser (and
        reasoning parser, if it has one). Images stay as placeholders in the turns' text, as in the engine's
        prompts."""
        from sgl_ray.entrypoints.requests import to_sampling_params
        from sgl_ray.protocol.tool_prompt import ToolFormat, tool_prompt
        from sgl_ray.reasoning import get_reasoning_parser

        require_assistant_turn(prompt, "with tools")
        turn_images(prompt.images, len(prompt.messages))  # each image in a finished turn
        args = self.engine.args
        if self._tool_format is None:
            self._tool_format = ToolFormat.for_tokenizer(self.engine.tokenizer, args.tool_call_parser)
        planned = tool_prompt(
            self.engine.tokenizer,
            self._tool_format,
            prompt.messages,
            list(tools.tools),
            to_sampling_params(params.to_native()),
            tool_choice=tools.choice,
            reasoning=get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None,
        )
        out = self.engine.generate(
            input_ids=planned.input_ids, sampling_params=planned.params, image_data=_sources(prompt.images)
        )
        parsed = planned.parse(out["text"])
        if on_delta is not None and parsed.content:
            on_delta(parsed.content)
        return GenResult(parsed.content, out["meta_info"], parsed.calls)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.engine.tokenizer.encode(t) for t in texts]

    def prompt_logprobs(
        self, prompts: Sequence[Sequence[int]], start: int, images: Sequence[ImageRef] = ()
    ) -> list[list[float | None]]:
        sources = _sources(images)
        outs = self.engine.generate(
            input_ids=[list(p) for p in prompts],
            sampling_params={"max_new_tokens": 0, "temperature": 0},
            return_logprob=True,
            logprob_start_len=start,
            image_data=None if sources is None else [sources] * len(prompts),
        )
        return [[lp for lp, *_ in o["meta_info"]["input_token_logprobs"]] for o in outs]

    def cache_prefix(self, text: str, images: Sequence[ImageRef] = ()) -> None:
        if text:
            self.engine.generate(text, {"max_new_tokens": 0}, image_data=_sources(images))

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()


def _sources(images: Sequence[ImageRef]) -> list[Any] | None:
    """What the engine reads (PIL images, bytes, paths, URLs); None without images."""
    return [image.source for image in images] or None
