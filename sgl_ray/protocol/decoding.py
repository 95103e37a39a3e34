"""Bytes → request Struct, with every decoding problem turned into an OpenAI-style 400.

Invariant: :func:`decode_request` either returns a request that passed its ``check()`` or raises
:class:`~sgl_ray.errors.InvalidRequestError` (never a msgspec, Unicode or recursion error: a body nested deeper
than the decoder follows, or than :data:`MAX_JSON_DEPTH` in a free-form field, is a 400 too). ``param`` is the top-level field
the problem is in (``$.messages[0].content`` → ``"messages"``), or ``None`` when the body as a whole is bad; inside a
field a request type lists in its ``nested_params`` (``/generate``'s ``sampling_params``), the field under it
(``$.sampling_params[0].top_k`` → ``"top_k"``), as the checks of its values name it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection
from typing import Any, Literal, TypeVar, overload

import msgspec
import msgspec.inspect as mi

from sgl_ray.errors import InvalidRequestError
from sgl_ray.protocol.requests import (
    AbortRequest,
    AnyRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
)
from sgl_ray.protocol.responses_api.request import ResponsesRequest

RequestKind = Literal["chat", "completion", "generate", "tokenize", "detokenize", "abort", "responses"]

REQUEST_TYPES: dict[str, type[AnyRequest | ResponsesRequest]] = {
    "chat": ChatCompletionRequest,
    "completion": CompletionRequest,
    "generate": GenerateRequest,
    "tokenize": TokenizeRequest,
    "detokenize": DetokenizeRequest,
    "abort": AbortRequest,
    "responses": ResponsesRequest,
}
MAX_JSON_DEPTH = 128
"""How deep a free-form value of a request (``chat_template_kwargs``, ``tools``, a JSON schema, …) may nest, counted
from the body's top level. The typed parts of a request have a fixed depth; a free-form value deeper than this
would reach Python's recursion limit in the code that walks it later (templates, schema compilers)."""
S = TypeVar("S", bound=msgspec.Struct)

# "<detail> - at `$.a.b[0]`", or for a dict key "<detail> - at `key` in `$.a.b`"
_AT_PATH = re.compile(r"^(?P<detail>.*) - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`$", re.DOTALL)
# a \uD800-\uDFFF escape that is not half of a high-low pair (the backslash before it not itself escaped)
_HIGH, _LOW = rb"\\u[dD][89abAB][0-9a-fA-F]{2}", rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(?:" + _HIGH + rb"(?!" + _LOW + rb")|(?<!" + _HIGH + rb")" + _LOW + rb")"
)
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_TOP_KEY = re.compile(r"^\.(?P<key>[A-Za-z_][A-Za-z0-9_]*)")
_INNER_KEY = re.compile(r"^(?:\[\d+\])?\.(?P<key>[A-Za-z_][A-Za-z0-9_]*)")  # "[0].top_k" or ".top_k"


@overload
def decode_request(kind: Literal["chat"], body: bytes) -> ChatCompletionRequest: ...
@overload
def decode_request(kind: Literal["completion"], body: bytes) -> CompletionRequest: ...
@overload
def decode_request(kind: Literal["generate"], body: bytes) -> GenerateRequest: ...
@overload
def decode_request(kind: Literal["tokenize"], body: bytes) -> TokenizeRequest: ...
@overload
def decode_request(kind: Literal["detokenize"], body: bytes) -> DetokenizeRequest: ...
@overload
def decode_request(kind: Literal["abort"], body: bytes) -> AbortRequest: ...
@overload
def decode_request(kind: Literal["responses"], body: bytes) -> ResponsesRequest: ...
def decode_request(kind: RequestKind, body: bytes) -> AnyRequest | ResponsesRequest:
    """Decode and check one request body of ``kind`` (``"chat"``, ``"completion"``, ``"generate"``, ``"tokenize"``,
    ``"detokenize"``, ``"abort"`` or ``"responses"``).

    Example::

        >>> decode_request("chat", b'{"messages": 5}')
        Traceback (most recent call last):
        ...
        sgl_ray.errors.InvalidRequestError: Invalid type for 'messages': expected `array`, got `int`.
    """
    cls = REQUEST_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown request kind {kind!r}; expected one of {sorted(REQUEST_TYPES)}")
    req = decode_struct(cls, body)
    req.check()
    return req


def decode_struct(cls: type[S], body: bytes) -> S:
    """Decode a JSON body into ``cls`` (any request ``Struct``) and check its depth, every problem an
    :class:`~sgl_ray.errors.InvalidRequestError` as for :func:`decode_request` (which also runs ``check()``).

    >>> class Ping(msgspec.Struct):
    ...     name: str
    >>> decode_struct(Ping, b'{"name": 1}')
    Traceback (most recent call last):
    ...
    sgl_ray.errors.InvalidRequestError: Invalid type for 'name': expected `str`, got `int`.
    """
    not_utf8 = "We could not parse the JSON body of your request: it is not valid UTF-8."
    try:
        req = _decoder(cls).decode(body)
    except UnicodeDecodeError:  # msgspec before 0.23
        raise InvalidRequestError(not_utf8) from None
    except RecursionError:  # msgspec stops at Python's recursion limit (about 1,000 levels here)
        raise too_deep() from None
    except msgspec.ValidationError as e:
        raise validation_error(str(e), nested=getattr(cls, "nested_params", ())) from None
    except msgspec.DecodeError as e:
        if "utf-8" in str(e).lower():  # msgspec 0.23: "Invalid UTF-8 encoded string"
            raise InvalidRequestError(not_utf8) from None
        if _LONE_SURROGATE.search(body):  # msgspec may call this "Input data was truncated"
            raise InvalidRequestError(
                "We could not parse the JSON body of your request: it has an unpaired UTF-16 surrogate escape "
                "(\\ud800 to \\udfff escapes must come as a high-low pair)."
            ) from None
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request ({e}). The API expects a JSON object."
        ) from None
    check_depth(req)
    return req


@functools.cache
def _decoder(cls: type) -> msgspec.json.Decoder:
    """One decoder per type (stateless and thread-safe; building one compiles the type)."""
    return msgspec.json.Decoder(cls)


def too_deep(limit: int | None = None) -> InvalidRequestError:
    """The 400 of a JSON body nested too deeply (deeper than ``limit`` levels, if known)."""
    levels = f" (more than {limit} levels)" if limit is not None else ""
    return InvalidRequestError(
        f"We could not parse the JSON body of your request: it is nested too deeply{levels}.",
        code="json_too_deep",
    )


def check_depth(req: msgspec.Struct, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise :func:`too_deep` if a free-form value of the decoded ``req`` nests deeper than ``limit`` levels.

    Only fields whose declared type can hold free-form JSON (``Any``, or a nested ``Struct``) are walked, so a
    prompt of a million token ids costs nothing here. The walk is iterative: no recursion of its own.
    """
    stack: list[tuple[Any, int]] = [(req, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            raise too_deep(limit)
        if isinstance(value, msgspec.Struct):
            children: Any = (getattr(value, name) for name in _free_form_fields(type(value)))
        elif isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        for child in children:
            if isinstance(child, (dict, list, msgspec.Struct)):
                stack.append((child, depth + 1))


@functools.cache
def _free_form_fields(cls: type) -> tuple[str, ...]:
    """The fields of ``cls`` that may hold free-form JSON or a nested struct."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return tuple(f.name for f in info.fields if _may_nest(f.type))


def _may_nest(t: mi.Type) -> bool:
    if isinstance(t, (mi.AnyType, mi.StructType)):
        return True
    if isinstance(t, mi.UnionType):
        return any(_may_nest(u) for u in t.types)
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        return _may_nest(t.item_type)
    if isinstance(t, mi.TupleType):
        return any(_may_nest(u) for u in t.item_types)
    if isinstance(t, mi.DictType):
        return _may_nest(t.value_type)
    return False


def validation_error(msgspec_message: str, *, nested: Collection[str] = ()) -> InvalidRequestError:
    """Translate a msgspec ``ValidationError`` message into an OpenAI-style error with ``param``: the top-level
    field, or for one in ``nested``, the field under it.

    >>> e = validation_error("Expected `str`, got `int` - at `$.messages[0].content`")
    >>> e.param, e.message
    ('messages', "Invalid type for 'messages[0].content': expected `str`, got `int`.")
    >>> validation_error("Expected `int`, got `str` - at `$.sampling_params[1].n`", nested=["sampling_params"]).param
    'n'
    """
    detail, path, key = msgspec_message, "", False
    m = _AT_PATH.match(msgspec_message)
    if m:
        detail, path, key = m["detail"], m["path"], bool(m["key"])
    missing = _MISSING.match(detail)
    if missing:
        full = _join(path, missing["field"])
        return InvalidRequestError(f"Missing required parameter: '{full}'.", param=_param_of(full, nested))
    if not path:
        if detail.startswith("Expected `object`"):
            return InvalidRequestError(f"The request body must be a JSON object ({_lower_first(detail)}).")
        return InvalidRequestError(f"Invalid request: {detail}.")
    shown = path.lstrip(".")
    if key:
        return InvalidRequestError(
            f"Invalid key in '{shown}': {_lower_first(detail)}.", param=_param_of(shown, nested) or shown
        )
    if detail.startswith("Expected "):
        return InvalidRequestError(
            f"Invalid type for '{shown}': {_lower_first(detail)}.", param=_param_of(shown, nested)
        )
    return InvalidRequestError(
        f"Invalid value for '{shown}': {_lower_first(detail)}.", param=_param_of(shown, nested)
    )


def _join(path: str, field: str) -> str:
    path = path.lstrip(".")
    return f"{path}.{field}" if path else field


def _top_key(path: str) -> str | None:
    m = _TOP_KEY.match("." + path.lstrip("."))
    return m["key"] if m else None


def _param_of(path: str, nested: Collection[str]) -> str | None:
    """The ``param`` of a problem at ``path``: its top-level key, or in a ``nested`` one, the key under it."""
    top = _top_key(path)
    if top is not None and top in nested:
        inner = _INNER_KEY.match(path.lstrip(".")[len(top) :])
        if inner:
            return inner["key"]
    return top


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]
