"""Range and stop-sequence checks shared by the request bodies (:mod:`sgl_ray.protocol.requests`) and the sampling
conversion (:mod:`sgl_ray.protocol.sampling`), each failure an OpenAI-style 400 that names the parameter.

Invariant: every integer a request carries fits int64 by the time it reaches the engine, so no value reaches numpy
or torch that they cannot hold. Fields with a tighter range (``n``, ``seed``, ``top_logprobs``, …) are held to it;
fields bounded by the model (``max_tokens``: the context; token ids: the vocabulary) are checked against it; the rest
(``top_k``, ``priority``, ``logprob_start_len``) are held to ``[INT64_MIN, INT64_MAX]`` here.

Example::

    >>> int_in(2**70, "top_k", high=INT64_MAX)
    Traceback (most recent call last):
    ...
    sgl_ray.errors.InvalidRequestError: Invalid 'top_k': integer above maximum value. Expected a value <= 9223372036854775807, but got 1180591620717411303424 instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from sgl_ray.errors import InvalidRequestError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_STOP_SEQUENCES = 16
"""Stop strings per request on the OpenAI routes (OpenAI allows 4; vLLM and SGLang more)."""
MAX_STOP_SEQUENCE_CHARS = 1024
"""Characters per stop string, on every route. Generous for a stop sequence, and it bounds the engine's work: a
stream holds back up to that many characters that could still become a stop string, and the stop-string automaton
grows with the strings' total length."""


def int_in(
    value: int, param: str, low: int | None = None, high: int | None = None, *, where: str | None = None
) -> None:
    """A 400 naming ``param`` (code ``integer_below_min_value`` / ``integer_above_max_value``) unless
    ``low <= value <= high`` (a ``None`` bound is not checked); ``where`` is the field as the request spells it,
    for the message (default ``param``)."""
    shown = where or param
    if low is not None and value < low:
        raise InvalidRequestError(
            f"Invalid '{shown}': integer below minimum value. Expected a value >= {low}, but got {value} "
            "instead.",
            param=param,
            code="integer_below_min_value",
        )
    if high is not None and value > high:
        raise InvalidRequestError(
            f"Invalid '{shown}': integer above maximum value. Expected a value <= {high}, but got {value} "
            "instead.",
            param=param,
            code="integer_above_max_value",
        )


def float_in(value: float, param: str, low: float, high: float, *, low_open: bool = False) -> None:
    """A 400 (code ``decimal_below_min_value`` / ``decimal_above_max_value``) unless ``value`` is in
    ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if value < low or (low_open and value == low):
        op = ">" if low_open else ">="
        raise InvalidRequestError(
            f"Invalid '{param}': decimal below minimum value. Expected a value {op} {low:g}, but got {value:g} "
            "instead.",
            param=param,
            code="decimal_below_min_value",
        )
    if value > high:
        raise InvalidRequestError(
            f"Invalid '{param}': decimal above maximum value. Expected a value <= {high:g}, but got {value:g} "
            "instead.",
            param=param,
            code="decimal_above_max_value",
        )


def check_stop_sequences(stop: str | Sequence[str] | None, where: str, *, param: str = "stop") -> None:
    """A 400 naming ``param`` for an empty stop string or one longer than :data:`MAX_STOP_SEQUENCE_CHARS` (code
    ``string_above_max_length``); ``where`` is the field as the request spells it (``stop``,
    ``sampling_params[1].stop``), for the message."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for i, s in enumerate(stops):
        shown = where if isinstance(stop, str) else f"{where}[{i}]"
        if s == "":  # it would match before any text: reject it rather than guess
            raise InvalidRequestError(
                f"Invalid '{shown}': an empty string. Stop sequences must be non-empty strings.", param=param
            )
        if len(s) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidRequestError(
                f"Invalid '{shown}': string too long. Expected a string with maximum length "
                f"{MAX_STOP_SEQUENCE_CHARS}, but got a string with length {len(s)} instead.",
                param=param,
                code="string_above_max_length",
            )
