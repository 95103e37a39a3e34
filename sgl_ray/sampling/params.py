"""Per-request sampling parameters (names follow SGLang's native API)."""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping
from typing import Any

import msgspec
import regex  # what StopChecker searches with

from sgl_ray.errors import InvalidRequestError

_MAX_STOP_STRINGS = 64
_MAX_N = 128
_INT64_MAX = 2**63 - 1  # integer fields end up in int64 arrays and tensors
_GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")
_LISTS = (list, tuple, set, frozenset)  # stop, stop_regex, stop_token_ids: None, a string or these


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """How one request is decoded.

    A key this struct does not know is an error (from a dict: ``InvalidRequestError`` naming it), not silently
    dropped; ``max_tokens`` and ``min_tokens`` (the OpenAI/vLLM names) are accepted for ``max_new_tokens`` and
    ``min_new_tokens``.

    ``temperature=0`` means greedy. ``top_k=-1`` (or 0) disables top-k. ``seed`` makes a sampled request
    reproducible regardless of what else shares its batch. ``stop`` strings are trimmed from the output unless
    ``no_stop_trim``; ``stop_token_ids`` end the request like EOS does.

    Example::

        >>> p = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=32, stop=["\\n\\n"])
        >>> p.normalized().stop
        ['\\n\\n']
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_regex: str | list[str] | None = (
        None  # SGLang: stop at the first match of a pattern (see StopChecker)
    )
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    # Structured outputs (at most one): the output must match a JSON schema, a regex, an EBNF (GBNF) grammar or an
    # xgrammar structural tag (JSON; what tool calling uses to force a model's call format).
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | dict[str, Any] | None = None
    # Aliases (OpenAI's and vLLM's names), folded into max_new_tokens / min_new_tokens by normalized().
    max_tokens: int | None = None
    min_tokens: int | None = None

    def normalized(self) -> SamplingParams:
        """A copy with ``stop`` as a list, ``top_k`` disabled as -1, the aliases folded in, and every field
        validated."""
        max_new, min_new = self.max_new_tokens, self.min_new_tokens
        for alias, name, default in (
            ("max_tokens", "max_new_tokens", 128),
            ("min_tokens", "min_new_tokens", 0),
        ):
            value = getattr(self, alias)
            if value is None:
                continue
            if not _is_int(value) or not (0 <= value <= _INT64_MAX):
                raise InvalidRequestError(
                    f"{alias}: must be a non-negative integer below 2**63, got {shown_value(value)}",
                    param=alias,
                )
            current = max_new if name == "max_new_tokens" else min_new
            if current != default and current != value:
                raise InvalidRequestError(
                    f"{alias}: set either {alias} or {name}, not both ({value} vs {shown_value(current)})",
                    param=alias,
                )
            if name == "max_new_tokens":
                max_new = value
            else:
                min_new = value
        _check_shapes(self)
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        p = msgspec.structs.replace(
            self,
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            max_tokens=None,
            min_tokens=None,
            stop=list(stop) if stop else None,
            stop_regex=[self.stop_regex] if isinstance(self.stop_regex, str) else (self.stop_regex or None),
            top_k=-1 if self.top_k in (0, -1) else self.top_k,
            logit_bias=_token_biases(self.logit_bias) if self.logit_bias else None,
            json_schema=_json_text(self.json_schema, "json_schema"),
            structural_tag=_json_text(self.structural_tag, "structural_tag"),
        )
        p.validate()
        return p

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise :class:`InvalidRequestError` naming the first bad field."""

        def bad(param: str, msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param}: {msg}", param=param)

        if not _is_int(self.max_new_tokens) or not (0 <= self.max_new_tokens <= _INT64_MAX):
            got = shown_value(self.max_new_tokens)
            raise bad("max_new_tokens", f"must be a non-negative integer below 2**63, got {got}")
        if not _is_int(self.min_new_tokens) or not (0 <= self.min_new_tokens <= self.max_new_tokens):
            raise bad(
                "min_new_tokens", f"must be in [0, max_new_tokens], got {shown_value(self.min_new_tokens)}"
            )
        for param, low, high, low_open in _NUMBER_RANGES:
            value = getattr(self, param)
            if not _number_in(value, low, high, low_open):
                interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
                raise bad(param, f"must be a number in {interval}, got {shown_value(value)}")
        if not _is_int(self.top_k) or self.top_k < -1 or self.top_k == 0 or self.top_k > _INT64_MAX:
            # a top_k at or above the vocabulary size keeps every token
            got = shown_value(self.top_k)
            raise bad("top_k", f"must be -1 (disabled) or a positive integer below 2**63, got {got}")
        if not _is_int(self.n) or not (1 <= self.n <= _MAX_N):
            raise bad("n", f"must be in [1, {_MAX_N}], got {shown_value(self.n)}")
        _check_shapes(self)
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > _MAX_STOP_STRINGS:
            raise bad("stop", f"at most {_MAX_STOP_STRINGS} stop strings")
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise bad("stop", "stop strings must be non-empty strings")
        patterns = [self.stop_regex] if isinstance(self.stop_regex, str) else (self.stop_regex or [])
        if len(patterns) > _MAX_STOP_STRINGS:
            raise bad("stop_regex", f"at most {_MAX_STOP_STRINGS} patterns")
        for pattern in patterns:
            if not isinstance(pattern, str) or pattern == "":
                raise bad("stop_regex", "patterns must be non-empty strings")
            try:
                regex.compile(pattern)
            except regex.error as e:
                raise bad(
                    "stop_regex", f"{shown_value(pattern)} is not a valid regular expression ({e})"
                ) from None
        for tid in self.stop_token_ids or []:
            if not _is_int(tid):
                raise bad("stop_token_ids", f"token ids must be integers, got {shown_value(tid)}")
            if tid < 0 or tid > _INT64_MAX or (vocab_size is not None and tid >= vocab_size):
                raise bad("stop_token_ids", f"token id {shown_value(tid)} is outside the vocabulary")
        if self.seed is not None and (not _is_int(self.seed) or not (0 <= self.seed <= _INT64_MAX)):
            raise bad("seed", f"must be in [0, 2**63), got {shown_value(self.seed)}")
        for tid, bias in _token_biases(self.logit_bias).items():
            if tid < 0 or tid > _INT64_MAX or (vocab_size is not None and tid >= vocab_size):
                raise bad("logit_bias", f"token id {shown_value(tid)} is outside the vocabulary")
            if not (-100.0 <= bias <= 100.0):
                raise bad("logit_bias", f"bias for token {tid} must be in [-100, 100], got {bias}")
        grammars = [k for k in _GRAMMAR_FIELDS if getattr(self, k) is not None]
        if len(grammars) > 1:
            raise bad(
                grammars[1],
                f"only one of {', '.join(_GRAMMAR_FIELDS)} may be set (got {', '.join(grammars)})",
            )
        for kind in grammars:
            value = getattr(self, kind)
            as_object = kind in ("json_schema", "structural_tag")
            if (isinstance(value, str) and not value.strip()) or not isinstance(value, (str, dict)):
                raise bad(kind, "must be a non-empty string" + (" or an object" if as_object else ""))

    @property
    def grammar(self) -> tuple[str, str] | None:
        """``(kind, text)`` of the grammar constraining the output, or None."""
        for kind in _GRAMMAR_FIELDS:
            value = getattr(self, kind)
            if value is not None:
                return kind, value if isinstance(value, str) else json.dumps(value)
        return None

    @property
    def needs_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0


def _token_biases(bias: Any) -> dict[int, float]:
    """``logit_bias`` as ``{token id: bias}``, or :class:`InvalidRequestError` (param ``logit_bias``) for anything
    but a mapping of token ids (integers, or strings of one as JSON keys are) to numbers (or strings of one). The
    range of ids and biases is :meth:`SamplingParams.validate`'s to check; a bias that is not finite is an error
    here.

    >>> _token_biases({"50256": -100, 7: 2.5})
    {50256: -100.0, 7: 2.5}
    >>> _token_biases({"abc": 1.0})
    Traceback (most recent call last):
    ...
    sgl_ray.errors.InvalidRequestError: logit_bias: key 'abc' is not a token id (an integer, or a string of one)
    """

    def bad(msg: str) -> InvalidRequestError:
        return InvalidRequestError(f"logit_bias: {msg}", param="logit_bias")

    if not bias:
        return {}
    if not isinstance(bias, Mapping):
        raise bad(f"must be an object mapping token ids to biases, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            if isinstance(key, bool):
                raise TypeError
            tid = int(key) if isinstance(key, str) else operator.index(key)  # not a float: 5.7 is no token id
        except (TypeError, ValueError):
            raise bad(f"key {shown_value(key)} is not a token id (an integer, or a string of one)") from None
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise bad(
                f"bias for token {shown_value(tid)} must be a number, got {shown_value(value)}"
            ) from None
        except OverflowError:  # an integer beyond any float
            raise bad(
                f"bias for token {shown_value(tid)} must be in [-100, 100], got {shown_value(value)}"
            ) from None
        if not math.isfinite(number):
            raise bad(f"bias for token {shown_value(tid)} must be a finite number, got {shown_value(value)}")
        out[tid] = number
    return out


def shown_value(value: Any, limit: int = 40) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters; an integer of more than 128 bits is
    shown by its size (its ``repr`` is slow, and an error past ``sys.get_int_max_str_digits()``).

    >>> shown_value(2**63), shown_value(-(10**5000)), shown_value("x" * 50)
    ('9223372036854775808', 'a negative integer of 16610 bits', "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...")
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{'a negative' if value < 0 else 'an'} integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # a container of a huge integer, a broken __repr__: no message may fail to build
        return f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# (field, low, high, whether low itself is excluded): the float fields and their ranges
_NUMBER_RANGES = (
    ("temperature", 0.0, 100.0, False),
    ("top_p", 0.0, 1.0, True),
    ("min_p", 0.0, 1.0, False),
    ("frequency_penalty", -2.0, 2.0, False),
    ("presence_penalty", -2.0, 2.0, False),
    ("repetition_penalty", 0.0, 2.0, True),
)


def _is_int(value: Any) -> bool:
    """An integer field's value: an ``int``, not a bool (``True`` is no count or token id)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number_in(value: Any, low: float, high: float, low_open: bool) -> bool:
    """Whether ``value`` is in the interval: False for NaN, a bool, and what does not compare with numbers (a
    string, None, an array) instead of a ``TypeError``."""
    if isinstance(value, bool):
        return False
    try:
        return bool((low < value if low_open else low <= value) and value <= high)
    except (TypeError, ValueError):
        return False


def _check_shapes(p: SamplingParams) -> None:
    """:class:`InvalidRequestError` unless ``stop`` and ``stop_regex`` are None, a string or a list (tuple, set) of
    them, and ``stop_token_ids`` None or a list (tuple, set): a ``SamplingParams`` built in Python has no type
    checks, and these are measured, iterated and tested for truth (an array's truth is an error) before
    :meth:`SamplingParams.validate` checks their items."""
    for param, text_ok in (("stop", True), ("stop_regex", True), ("stop_token_ids", False)):
        value = getattr(p, param)
        if value is None or (text_ok and isinstance(value, str)) or isinstance(value, _LISTS):
            continue
        kinds = "a string or a list of strings" if text_ok else "a list of token ids"
        raise InvalidRequestError(f"{param}: must be {kinds}, got {type(value).__name__}", param=param)


def _json_text(value: Any, param: str) -> Any:
    """A ``json_schema`` or ``structural_tag`` object as JSON text (anything else as it is: ``validate`` checks
    it), or :class:`InvalidRequestError` naming ``param`` if it has no JSON form."""
    if not isinstance(value, dict):
        return value
    try:
        return json.dumps(value)
    except TypeError as e:  # "Object of type ... is not JSON serializable"
        raise InvalidRequestError(f"{param}: the object has no JSON form ({e})", param=param) from None
    except (ValueError, RecursionError):  # a cycle, an integer too long for str(), deep nesting
        raise InvalidRequestError(
            f"{param}: the object has no JSON form (a cycle, too deep, or an integer too long to write)",
            param=param,
        ) from None
