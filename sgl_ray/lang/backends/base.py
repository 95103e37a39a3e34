"""The seam between program states and what runs the model.

A :class:`Backend` generates text for a prompt and scores the choices of a ``select``. Three implement it:
:class:`~sgl_ray.lang.RuntimeEndpoint` (our native ``/generate`` over HTTP), :class:`~sgl_ray.lang.OpenAI`
(any OpenAI-compatible server) and :class:`~sgl_ray.lang.EngineBackend` (an in-process ``sgl_ray.Engine``).
Backends that can tokenize and return prompt logprobs share :class:`TokenScoringBackend`'s exact scoring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from sgl_ray.errors import InvalidRequestError
from sgl_ray.function_call import ToolCall
from sgl_ray.lang.images import ImageRef
from sgl_ray.lang.ir import GenParams, GenTools
from sgl_ray.lang.template import RoleFormat
from sgl_ray.multimodal.inputs import InvalidImageError

DeltaSink = Callable[[str], None]


class Prompt(NamedTuple):
    """What a backend sees of a program state: its text, the finished chat turns, the open turn (if any), and
    the images of the text in order (each one's placeholder is in the text and in its turn's content)."""

    text: str
    messages: list[dict[str, str]]
    open_role: str | None = None
    open_content: str = ""
    images: tuple[ImageRef, ...] = ()


class GenResult(NamedTuple):
    text: str
    meta_info: dict[str, Any]  # prompt_tokens, completion_tokens, cached_tokens, finish_reason where known
    tool_calls: list[ToolCall] | None = None  # the parsed calls of a gen with tools (None without tools)


class Backend(ABC):
    """Contract:

    - ``role_format()`` — how this model writes roles (its chat template), fetched once and cached.
    - ``generate(prompt, params, on_delta, tools=None)`` — the continuation of ``prompt.text`` under ``params``;
      with ``on_delta`` it streams, calling it with each text delta before returning the whole result. Server
      errors raise typed :mod:`sgl_ray.errors` exceptions. With ``tools`` the prompt must end in an open,
      empty assistant turn: the reply to ``prompt.messages`` is generated as a chat completion with those tools,
      ``text`` is its content and ``tool_calls`` its calls (backends that cannot raise
      :class:`~sgl_ray.errors.UnsupportedFeatureError`).
    - ``choice_logprobs(context, choices, images)`` — for each choice, the logprobs of the tokens
      ``context + choice`` adds after ``context`` (each list non-empty, ``context`` may be ""), with ``images``
      those of ``context``.
    - ``cache_prefix(text, images)`` — warm the server's prefix cache with ``text`` and its images (forks call
      it); may do nothing.
    - ``image_token()`` — the text that stands for an image (``role_format().image_token``); raises
      :class:`~sgl_ray.multimodal.InvalidImageError` where the model takes no images.
    - ``flush_cache()`` — drop the prefix cache (benchmarks); False where not possible.
    """

    @abstractmethod
    def role_format(self) -> RoleFormat: ...

    @abstractmethod
    def generate(
        self,
        prompt: Prompt,
        params: GenParams,
        on_delta: DeltaSink | None = None,
        tools: GenTools | None = None,
    ) -> GenResult: ...

    @abstractmethod
    def choice_logprobs(
        self, context: str, choices: Sequence[str], images: Sequence[ImageRef] = ()
    ) -> list[list[float]]: ...

    def cache_prefix(self, text: str, images: Sequence[ImageRef] = ()) -> None:  # noqa: B027 - optional hook
        """Warm the prefix cache with ``text`` (nothing by default)."""

    def image_token(self) -> str:
        token = self.role_format().image_token
        if token is None:
            raise InvalidImageError("image(): this model takes no image inputs", param="image")
        return token

    def flush_cache(self) -> bool:
        """Drop the server's prefix cache; False where the backend cannot (or requests are running)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def require_assistant_turn(prompt: Prompt, why: str) -> None:
    """Raise unless the gen opens an assistant turn (chat APIs generate a whole assistant message)."""
    if prompt.open_role != "assistant" or prompt.open_content:
        raise InvalidRequestError(f"{why}, gen() must start an assistant turn: s += assistant(gen(...))")


def join_stream(chunks: Iterable[dict], on_delta: DeltaSink) -> GenResult:
    """Fold native-API stream chunks (``text`` deltas, ``meta_info``) into one result, passing each delta on."""
    text, meta = "", {}
    for chunk in chunks:
        if chunk["text"]:
            on_delta(chunk["text"])
        text += chunk["text"]
        meta = chunk["meta_info"]
    return GenResult(text, meta)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class TokenScoringBackend(Backend):
    """Exact choice scoring from a tokenizer and prompt logprobs.

    Algorithm: tokenize ``context`` and every ``context + choice``; a choice's own tokens start where its ids
    leave the context's ids (a choice that merges with the context's last token re-scores that token). Then one
    batched prompt-logprob call over all ``context + choice`` ids, starting at the earliest such position, so the
    shared context comes from the prefix cache.
    """

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    @abstractmethod
    def prompt_logprobs(
        self, prompts: Sequence[Sequence[int]], start: int, images: Sequence[ImageRef] = ()
    ) -> list[list[float | None]]:
        """For each prompt (all with the same ``images``, their placeholders not yet expanded), the logprobs of
        its tokens from position ``start`` on (``None`` at position 0); at least its last ``len - start``."""

    def choice_logprobs(
        self, context: str, choices: Sequence[str], images: Sequence[ImageRef] = ()
    ) -> list[list[float]]:
        ids = self.tokenize([context, *[context + c for c in choices]])
        ctx, full = ids[0], ids[1:]
        # Position 0 has no logprob: a choice that starts the text is scored from its second token. An image's
        # placeholder grows into its tokens on the server, before the choice: the choice's tokens stay the tail.
        starts = [min(max(common_prefix_len(ctx, f), 1), len(f) - 1) for f in full]
        lps = self.prompt_logprobs(full, min(starts), images)
        out = []
        for f, s, lp in zip(full, starts, lps, strict=True):
            own = [x for x in lp[len(lp) - (len(f) - s) :] if x is not None]
            out.append(own)
        return out
