"""Request bodies of the OpenAI-compatible and SGLang-native endpoints, as ``msgspec.Struct``s.

Invariants:

* Unknown fields are ignored (OpenAI clients send fields we do not know, e.g. ``store``); known
  fields are type-checked strictly by msgspec (``"n": "2"`` or ``"max_tokens": 1.5`` is a 400).
* Every optional OpenAI field is nullable (``"temperature": null`` means "use the default"), as in OpenAI's spec;
  defaults are resolved in :mod:`sgl_ray.protocol.sampling`, not here.
* ``check()`` holds the model-independent semantic checks (content parts, prompt shapes, flags that need other
  flags, integers without a model-given bound held to int64: :mod:`sgl_ray.protocol.checks`); ranges that need the
  model (vocabulary, context length) are checked by ``to_sampling_params``.
  :func:`~sgl_ray.protocol.decoding.decode_request` runs ``check()`` on every request it returns.
* ``/generate``'s ``sampling_params`` are the engine's own :class:`SamplingParams`: a 400 about one of its fields
  names that field as ``param`` (``max_new_tokens``, ``stop_token_ids``), whether its type or its value is wrong,
  and the message names where it is (``Invalid 'sampling_params.max_new_tokens': ...``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import msgspec

from sgl_ray.errors import InvalidRequestError
from sgl_ray.protocol.checks import INT64_MAX, INT64_MIN, check_stop_sequences, int_in
from sgl_ray.protocol.structured import ResponseFormat
from sgl_ray.protocol.tools import check_message_tool_calls, parse_tool_choice, parse_tools
from sgl_ray.sampling.params import SamplingParams

Role = Literal["system", "user", "assistant", "tool", "developer"]
_IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
_ENGINE_FIELDS = frozenset(SamplingParams.__struct_fields__)
_ENGINE_ALIASES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}  # engine field → its alias
MAX_TOP_LOGPROBS_NUM = 20  # /generate's top_logprobs_num, and completions' prompt_logprobs


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of every request body (msgspec does not inherit ``kw_only``: each subclass restates it)."""


class StreamOptions(_Body, kw_only=True):
    """``stream_options``: with ``include_usage`` a last chunk carries the usage and no choices; with
    ``continuous_usage_stats`` too (vLLM's name), every chunk carries the usage so far."""

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ContentPart(_Body, kw_only=True):
    """One part of a message's ``content`` list: ``{"type": "text", "text": ...}``, or for a vision-language model
    ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (see sgl_ray.multimodal.chat)."""

    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None


class ChatMessage(_Body, kw_only=True):
    """One chat message. ``content`` is a string, a list of text parts, or null (an assistant turn that only
    calls tools). ``tool_calls`` (assistant) is kept raw for the chat template; a ``tool`` message answers the call
    ``tool_call_id``."""

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str | None:
        """The content as one string (text parts joined with newlines, as vLLM does for string templates)."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)

    def check(self) -> None:
        check_message_tool_calls(self.role, self.tool_calls, self.tool_call_id)
        if isinstance(self.content, list):
            for part in self.content:
                if part.type == "image_url":
                    continue  # its URL is checked where the images are read (sgl_ray.multimodal.chat)
                if part.type in _IMAGE_PART_TYPES:
                    raise InvalidRequestError(
                        f"content part type '{part.type}' is not supported; use 'image_url'", param="messages"
                    )
                if part.type != "text":
                    raise InvalidRequestError(
                        f"content part type '{part.type}' is not supported; use 'text'", param="messages"
                    )
                if part.text is None:
                    raise InvalidRequestError(
                        "Missing required parameter: a 'text' content part needs 'text'.", param="messages"
                    )


class _SamplingFields(_Body, kw_only=True):
    """Fields shared by chat and completions: OpenAI's sampling knobs plus SGLang/vLLM extras."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras (SGLang/vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    stop_token_ids: list[int] | None = None
    no_stop_trim: bool | None = None
    stop_regex: str | list[str] | None = None  # SGLang: stop at the first match of a pattern
    rid: str | None = None  # SGLang: the client's request id, for /abort_request
    priority: int | None = None  # SGLang: higher runs first under schedule_policy "priority"
    # structured outputs: OpenAI's response_format, or one SGLang-style grammar, or one of a list of strings
    response_format: ResponseFormat | None = None
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    choice: list[str] | None = None
    guided_choice: list[str] | None = None  # vLLM's older name of ``choice``

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Whether every streamed chunk carries the usage so far (``include_usage`` and
        ``continuous_usage_stats``, as vLLM requires both)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def choices(self) -> list[str] | None:
        """``choice`` or its alias ``guided_choice``."""
        return self.choice if self.choice is not None else self.guided_choice

    @property
    def grammar_param(self) -> str | None:
        """The field the output grammar comes from (what a grammar the compiler rejects is a 400 about), or None."""
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        names = ("json_schema", "regex", "ebnf", "choice", "guided_choice")
        return next((name for name in names if getattr(self, name) is not None), None)

    def _check_shared(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        if self.choice is not None and self.guided_choice is not None:
            raise InvalidRequestError("Pass 'choice' or 'guided_choice', not both.", param="guided_choice")
        choices = self.choices
        if choices is not None and (not choices or any(not c for c in choices)):
            raise InvalidRequestError(
                "Invalid 'choice': expected a non-empty array of non-empty strings.", param="choice"
            )
        if self.rid is not None and not self.rid:
            raise InvalidRequestError("Invalid 'rid': an empty string.", param="rid")
        # a top_k below -1 is the engine's to refuse; one at or above the vocabulary size keeps every token
        if self.top_k is not None:
            int_in(self.top_k, "top_k", high=INT64_MAX)
        if self.priority is not None:
            int_in(self.priority, "priority", INT64_MIN, INT64_MAX)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``.

    ``max_completion_tokens`` takes precedence over the deprecated ``max_tokens``. ``tools`` and ``tool_choice``
    are kept raw and checked here (see :mod:`sgl_ray.protocol.tools`).

    Example::

        >>> from sgl_ray.protocol import decode_request
        >>> req = decode_request("chat", b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}')
        >>> req.messages[0].text()
        'Hi'
    """

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool | None = None  # SGLang: false keeps the reasoning in the content
    # vLLM/SGLang: continue the last (assistant) message instead of starting a new turn
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None

    @property
    def generation_prompt(self) -> bool:
        """Whether the template adds the assistant turn's header (not when continuing the last message)."""
        if self.add_generation_prompt is not None:
            return self.add_generation_prompt
        return not self.continue_final_message

    @property
    def max_tokens_param(self) -> str:
        """Which field the token limit came from (for error messages)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        if not self.messages:
            raise InvalidRequestError(
                "Invalid 'messages': empty array. Expected an array with minimum length 1.", param="messages"
            )
        for message in self.messages:
            message.check()
        parse_tool_choice(self.tool_choice, parse_tools(self.tools))
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise InvalidRequestError(
                    "'continue_final_message' and 'add_generation_prompt' cannot both be true.",
                    param="continue_final_message",
                )
            if self.messages[-1].role != "assistant":
                raise InvalidRequestError(
                    "'continue_final_message' needs the last message to be an assistant message.",
                    param="continue_final_message",
                )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError(
                "Invalid value for 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is set.",
                param="top_logprobs",
            )
        self._check_shared()


class CompletionRequest(_SamplingFields, kw_only=True):
    """``POST /v1/completions`` (legacy). ``prompt`` is a string, a list of strings, a list of token ids or a
    list of token-id lists. ``logprobs`` is the number of top alternatives (0..5) per token.

    Example::

        >>> from sgl_ray.protocol import decode_request
        >>> decode_request("completion", b'{"model": "m", "prompt": [[1, 2], [3]]}').prompt_batch()
        (None, [[1, 2], [3]])
    """

    prompt: str | list[str | int | list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = None  # vLLM: the prompt tokens' logprobs, with this many alternatives

    def prompt_batch(self) -> tuple[list[str] | None, list[list[int]] | None]:
        """``(texts, None)`` or ``(None, token_lists)``: the prompts of this request, one per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p], None
        if p and all(isinstance(x, str) for x in p):
            return [x for x in p if isinstance(x, str)], None
        if p and all(isinstance(x, int) for x in p):
            return None, [[x for x in p if isinstance(x, int)]]
        if p and all(isinstance(x, list) for x in p):
            return None, [x for x in p if isinstance(x, list)]
        raise InvalidRequestError(
            "Invalid 'prompt': expected a string, an array of strings, an array of token ids or an array of "
            "token-id arrays (non-empty, not mixed).",
            param="prompt",
        )

    def check(self) -> None:
        texts, token_lists = self.prompt_batch()
        if token_lists is not None and any(not ids for ids in token_lists):
            raise InvalidRequestError("Invalid 'prompt': a token-id prompt is empty.", param="prompt")
        if self.suffix:
            raise InvalidRequestError("'suffix' is not supported.", param="suffix")
        if self.prompt_logprobs is not None:
            int_in(self.prompt_logprobs, "prompt_logprobs", 0, MAX_TOP_LOGPROBS_NUM)
        self._check_shared()


class GenerateRequest(_Body, kw_only=True):
    """SGLang-native ``POST /generate``: ``text`` or ``input_ids`` (one prompt or a batch), ``sampling_params``
    in SGLang names (one for all prompts, or a list matching them).

    ``rid`` names the request (its results' ``meta_info.id``) for ``/abort_request``; ``priority`` orders it under
    ``schedule_policy="priority"``; ``model`` picks one of an app's models (default: its first).

    ``check()`` validates each ``sampling_params`` as the engine will (bar the vocabulary, which needs the model),
    plus stop-string lengths and int64 bounds; its 400s name the engine field as ``param`` (see the module
    docstring).

    Example::

        >>> from sgl_ray.protocol import decode_request
        >>> req = decode_request("generate", b'{"text": "Hi", "sampling_params": {"max_new_tokens": 4}}')
        >>> req.engine_kwargs()["sampling_params"].max_new_tokens
        4
    """

    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    rid: str | None = None
    priority: int | None = None
    model: str | None = None
    lora_path: str | None = None  # a loaded LoRA adapter's name
    separate_reasoning: bool = False  # split the server's reasoning parser's reasoning into "reasoning_text"
    # vision-language models: a prompt's images (one or a list; for a batch, one entry per prompt) as data: URLs
    image_data: Any = None

    nested_params: ClassVar[tuple[str, ...]] = ("sampling_params",)
    """Fields whose own fields a 400 names as its ``param`` (read by :func:`~sgl_ray.protocol.decode_struct`)."""

    def check(self) -> None:
        if (self.text is None) == (self.input_ids is None):
            raise InvalidRequestError("Pass exactly one of 'text' or 'input_ids'.", param="text")
        if isinstance(self.text, list) and not self.text:
            raise InvalidRequestError("Invalid 'text': empty array.", param="text")
        ids = self.input_ids
        if ids is not None and not (
            (ids and all(isinstance(t, int) for t in ids))
            or (ids and all(isinstance(x, list) and x for x in ids))
        ):
            raise InvalidRequestError(
                "Invalid 'input_ids': expected a non-empty array of token ids or of non-empty token-id arrays.",
                param="input_ids",
            )
        int_in(self.top_logprobs_num, "top_logprobs_num", 0, MAX_TOP_LOGPROBS_NUM)
        int_in(self.logprob_start_len, "logprob_start_len", -1, INT64_MAX)
        if self.priority is not None:
            int_in(self.priority, "priority", INT64_MIN, INT64_MAX)
        if self.rid is not None and not self.rid:
            raise InvalidRequestError("Invalid 'rid': an empty string.", param="rid")
        sp = self.sampling_params
        if isinstance(sp, list):
            for i, params in enumerate(sp):
                check_native_params(params, f"sampling_params[{i}]")
        elif sp is not None:
            check_native_params(sp, "sampling_params")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`sgl_ray.Engine.generate` (the engine validates sampling params against
        the vocabulary itself)."""
        return {
            "prompt": self.text,
            "input_ids": self.input_ids,
            "sampling_params": self.sampling_params,
            "return_logprob": self.return_logprob,
            "logprob_start_len": self.logprob_start_len,
            "top_logprobs_num": self.top_logprobs_num,
            "stream": self.stream,
        }


def check_native_params(params: SamplingParams, where: str = "sampling_params") -> None:
    """Raise a 400 for engine sampling parameters the engine would refuse (vocabulary aside), a stop string that is
    empty or longer than :data:`~sgl_ray.protocol.checks.MAX_STOP_SEQUENCE_CHARS`, or a ``max_new_tokens``
    (``max_tokens``) or ``top_k`` beyond int64; ``where`` is where they are in the request
    (``sampling_params``, ``sampling_params[2]``)."""
    check_stop_sequences(params.stop, f"{where}.stop")
    for name in ("max_new_tokens", "max_tokens", "top_k"):
        value = getattr(params, name)
        if value is not None:
            int_in(value, name, high=INT64_MAX, where=f"{where}.{name}")
    try:
        params.normalized()
    except InvalidRequestError as e:
        # the engine folds max_tokens/min_tokens into its own fields: name the field the request set
        alias = _ENGINE_ALIASES.get(e.param or "")
        if alias is not None and getattr(params, alias) is not None and e.message.startswith(f"{e.param}: "):
            e = InvalidRequestError(f"{alias}: {e.message[len(e.param or '') + 2 :]}", param=alias)
        raise sampling_params_error(e, where) from None


def sampling_params_error(err: InvalidRequestError, where: str = "sampling_params") -> InvalidRequestError:
    """The engine's 400 about one of its sampling parameters (``"top_k: must be ..."``, param ``top_k``) worded
    as the other 400s are: ``Invalid 'sampling_params.top_k': must be ...``, still naming ``top_k`` as the param
    (as a type error there does). Any other error is returned as it is.

    >>> e = sampling_params_error(InvalidRequestError("n: must be in [1, 128], got 0", param="n"))
    >>> e.message, e.param
    ("Invalid 'sampling_params.n': must be in [1, 128], got 0", 'n')
    """
    param = err.param or ""
    prefix = f"{param}: "
    if param not in _ENGINE_FIELDS or not err.message.startswith(prefix):
        return err
    return InvalidRequestError(
        f"Invalid '{where}.{param}': {err.message[len(prefix) :]}", param=param, code=err.code
    )


@contextmanager
def sampling_params_errors(where: str = "sampling_params") -> Iterator[None]:
    """Re-raise the engine's 400s about its sampling parameters as :func:`sampling_params_error` words them (what
    ``/generate`` wraps its checks against the model in)."""
    try:
        yield
    except InvalidRequestError as e:
        err = sampling_params_error(e, where)
        if err is e:
            raise
        raise err from None


class TokenizeRequest(_Body, kw_only=True):
    """``POST /tokenize``: ``{"text": str | [str]}``, tokenized as ``/generate`` tokenizes a text prompt
    (``model``: which of an app's models; default its first)."""

    text: str | list[str]
    model: str | None = None

    def check(self) -> None:
        if isinstance(self.text, list) and not self.text:
            raise InvalidRequestError("Invalid 'text': empty array.", param="text")


class DetokenizeRequest(_Body, kw_only=True):
    """``POST /detokenize`` (SGLang): ``{"tokens": ids | [ids]}`` → ``{"text": str | [str]}``."""

    tokens: list[int | list[int]]
    skip_special_tokens: bool = True
    model: str | None = None

    @property
    def batch(self) -> bool:
        return bool(self.tokens) and isinstance(self.tokens[0], list)

    def check(self) -> None:
        if any(isinstance(t, list) != self.batch for t in self.tokens):
            raise InvalidRequestError(
                "Invalid 'tokens': expected an array of token ids or an array of token-id arrays, not mixed.",
                param="tokens",
            )


class AbortRequest(_Body, kw_only=True):
    """``POST /abort_request`` (SGLang): the running request named ``rid``, or every one with ``abort_all``."""

    rid: str | None = None
    abort_all: bool = False

    def check(self) -> None:
        if not self.rid and not self.abort_all:
            raise InvalidRequestError("Pass 'rid' or 'abort_all': true.", param="rid")


AnyRequest = (
    ChatCompletionRequest
    | CompletionRequest
    | GenerateRequest
    | TokenizeRequest
    | DetokenizeRequest
    | AbortRequest
)
