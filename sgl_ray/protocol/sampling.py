"""OpenAI request fields → engine :class:`SamplingParams`, with OpenAI-style 400s for every bad value.

Limits (OpenAI's, where it has one): ``temperature`` in [0, 2]; ``top_p`` in (0, 1]; penalties in [-2, 2];
``n`` in [1, 128]; chat ``top_logprobs`` in [0, 20] and only with ``logprobs: true``; completions ``logprobs``
in [0, 5]; ``logit_bias`` keys are token ids of this vocabulary with values in [-100, 100]; ``seed`` in
[0, 2**63). ``stop`` takes up to 16 non-empty strings (OpenAI allows 4; we allow more, as vLLM/SGLang do) of
at most 1024 characters each (:data:`~sgl_ray.protocol.checks.MAX_STOP_SEQUENCE_CHARS`). ``top_k`` and ``priority``
must fit int64 (checked when the request is decoded: :mod:`sgl_ray.protocol.checks`); a ``top_k`` at or above the
vocabulary size keeps every token.

Token budget: the prompt must leave room in the context (``prompt_len < context_length``) and
``prompt_len + max_tokens <= context_length``; both fail with code ``context_length_exceeded``. A chat request
without ``max_tokens`` gets the whole rest of the context; a completion defaults to 16 (OpenAI's default).
``max_tokens`` must be >= 1 for chat and >= 0 for completions (0 with ``echo`` scores a prompt).
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from sgl_ray.errors import InvalidRequestError
from sgl_ray.protocol.checks import (
    INT64_MAX,
    MAX_STOP_SEQUENCES,
    check_stop_sequences,
    float_in,
    int_in,
)
from sgl_ray.protocol.requests import ChatCompletionRequest, CompletionRequest
from sgl_ray.protocol.structured import grammar_fields
from sgl_ray.sampling.params import SamplingParams

MAX_N = 128
# MAX_STOP_SEQUENCES (16 stop strings per request) and MAX_STOP_SEQUENCE_CHARS (1024 characters per stop string)
# are defined in sgl_ray.protocol.checks, whose stop checks /generate shares.
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"

# engine field → the request field a user knows it by
_ENGINE_TO_OPENAI = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class LogprobOptions(NamedTuple):
    """What to ask the engine for so a response can carry the requested logprobs."""

    return_logprob: bool
    top_logprobs_num: int
    logprob_start_len: int  # -1: no prompt logprobs; 0: all of them (completions with echo)


def logprob_options(req: ChatCompletionRequest | CompletionRequest) -> LogprobOptions:
    """Engine logprob arguments for ``req``: chat ``logprobs``/``top_logprobs``, completions ``logprobs`` (with
    ``echo`` or ``prompt_logprobs``, the prompt's logprobs too)."""
    if isinstance(req, ChatCompletionRequest):
        return LogprobOptions(bool(req.logprobs), (req.top_logprobs or 0) if req.logprobs else 0, -1)
    if req.prompt_logprobs is not None:  # vLLM's: the prompt's logprobs without echoing it
        return LogprobOptions(True, max(req.logprobs or 0, req.prompt_logprobs), 0)
    if req.logprobs is None:
        return LogprobOptions(False, 0, -1)
    return LogprobOptions(True, req.logprobs, 0 if req.echo else -1)


def check_prompt_length(prompt_len: int, context_length: int, *, param: str = "messages") -> None:
    """Raise a 400 for an empty prompt (a text that encodes to no tokens: the model needs at least one), and a
    ``context_length_exceeded`` 400 unless the prompt leaves room for at least one token."""
    what = "messages" if param == "messages" else "prompt"
    if prompt_len == 0:
        raise InvalidRequestError(
            f"Invalid '{param}': the prompt is empty (it encodes to no tokens; at least one is needed).",
            param=param,
        )
    if prompt_len >= context_length:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_length} tokens. However, your {what} resulted "
            f"in {prompt_len} tokens. Please reduce the length of the {what}.",
            param=param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )


def check_token_budget(
    prompt_len: int, max_tokens: int, context_length: int, *, param: str = "max_tokens", what: str = "prompt"
) -> None:
    """Raise a ``context_length_exceeded`` 400 (naming ``param``) if the prompt and ``max_tokens`` new tokens do
    not fit the context together; ``what`` names the prompt in the message ("messages" or "prompt")."""
    if prompt_len + max_tokens > context_length:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the completion). "
            f"Please reduce the length of the {what} or completion.",
            param=param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )


def check_prompt_ids(token_ids: list[int], vocab_size: int, *, param: str = "prompt") -> None:
    """Raise a 400 if a token-id prompt holds an id outside ``[0, vocab_size)``."""
    for tid in token_ids:
        if not 0 <= tid < vocab_size:
            raise InvalidRequestError(
                f"Invalid '{param}': token id {tid} is outside the vocabulary [0, {vocab_size}).", param=param
            )


def to_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    vocab_size: int,
    context_length: int,
    prompt_len: int,
    *,
    defaults: SamplingParams | None = None,
) -> SamplingParams:
    """Validate ``req`` against the model and return the engine's (normalized) sampling parameters.

    ``prompt_len`` is the prompt's token count (for a batch of prompts, the longest). ``defaults`` supplies
    values for fields the request leaves unset (e.g. from the model's generation config).

    Example::

        >>> from sgl_ray.protocol import decode_request
        >>> req = decode_request("chat", b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}')
        >>> to_sampling_params(req, vocab_size=100, context_length=64, prompt_len=10).max_new_tokens
        8
    """
    req.check()
    is_chat = isinstance(req, ChatCompletionRequest)
    prompt_param = "messages" if is_chat else "prompt"
    check_prompt_length(prompt_len, context_length, param=prompt_param)

    if isinstance(req, ChatCompletionRequest):
        max_param, max_tokens = req.max_tokens_param, req.requested_max_tokens
        if max_tokens is None:
            max_tokens = context_length - prompt_len
        int_in(max_tokens, max_param, 1)
        if req.top_logprobs is not None:
            int_in(req.top_logprobs, "top_logprobs", 0, MAX_CHAT_TOP_LOGPROBS)
    else:
        max_param, max_tokens = "max_tokens", req.max_tokens if req.max_tokens is not None else 16
        int_in(max_tokens, max_param, 0)
        if req.logprobs is not None:
            int_in(req.logprobs, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    check_token_budget(prompt_len, max_tokens, context_length, param=max_param, what=prompt_param)

    if req.n is not None:
        int_in(req.n, "n", 1, MAX_N)
    if req.temperature is not None:
        float_in(req.temperature, "temperature", 0.0, 2.0)
    if req.top_p is not None:
        float_in(req.top_p, "top_p", 0.0, 1.0, low_open=True)
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None:
            float_in(value, name, -2.0, 2.0)
    if req.seed is not None:
        int_in(req.seed, "seed", 0, INT64_MAX)
    if req.min_tokens is not None:
        int_in(req.min_tokens, "min_tokens", 0, max_tokens)

    fields: dict[str, object] = {
        "max_new_tokens": max_tokens,
        "stop": _stop_list(req.stop),
        "logit_bias": _logit_bias(req.logit_bias, vocab_size),
        "min_new_tokens": req.min_tokens,
        "n": req.n,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "stop_token_ids": req.stop_token_ids,
        "stop_regex": req.stop_regex,
        "no_stop_trim": req.no_stop_trim,
        **grammar_fields(req.response_format, req.json_schema, req.regex, req.ebnf, req.choices),
    }
    base = defaults if defaults is not None else SamplingParams()
    params = msgspec.structs.replace(base, **{k: v for k, v in fields.items() if v is not None})
    try:
        params = params.normalized()
        params.validate(vocab_size)
    except InvalidRequestError as e:  # the engine names its own fields; report the request's
        param = _ENGINE_TO_OPENAI.get(e.param or "", e.param)
        raise InvalidRequestError(f"Invalid '{param}': {e.message.split(': ', 1)[-1]}", param=param) from None
    return params


def _stop_list(stop: str | list[str] | None) -> list[str] | None:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(
            f"Invalid 'stop': array too long. Expected an array with at most {MAX_STOP_SEQUENCES} "
            f"sequences, but got {len(stops)} instead.",
            param="stop",
        )
    check_stop_sequences(stop, "stop")
    return stops or None


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tid = int(key.strip())
        except ValueError:
            raise InvalidRequestError(
                f"Invalid 'logit_bias': key '{key}' is not a token id (an integer as a string).",
                param="logit_bias",
            ) from None
        if not 0 <= tid < vocab_size:
            raise InvalidRequestError(
                f"Invalid 'logit_bias': token id {tid} is outside the vocabulary [0, {vocab_size}).",
                param="logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise InvalidRequestError(
                f"Invalid 'logit_bias': the bias for token {tid} must be in [-100, 100], got {value}.",
                param="logit_bias",
            )
        out[tid] = float(value)
    return out
