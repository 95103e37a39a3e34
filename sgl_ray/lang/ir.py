"""The expressions a program appends to its state: text, ``gen``, ``select``, role markers, and their sums.

``s += "Q: " + gen("a", max_tokens=16)`` appends a :class:`Concat` of a constant and a generation; the state runs
the parts in order. Expressions are plain values (frozen dataclasses) that a backend never sees — the state turns
them into backend calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sgl_ray.errors import InvalidRequestError
from sgl_ray.lang.choices import ChoicesMethod, token_length_normalized
from sgl_ray.protocol.tools import parse_tool_choice, parse_tools

_ROLE_NAMES = ("system", "user", "assistant")


class Expr:
    """Anything that can be appended to a program state."""

    def __add__(self, other: Any) -> Concat:
        return Concat((*_parts(self), *_parts(as_expr(other))))

    def __radd__(self, other: Any) -> Concat:
        return Concat((*_parts(as_expr(other)), *_parts(self)))


def _parts(e: Expr) -> tuple[Expr, ...]:
    return e.items if isinstance(e, Concat) else (e,)


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise InvalidRequestError(
        f"a program state accepts str, gen(), select(), image() or role expressions, not {type(value).__name__}"
    )


@dataclass(frozen=True)
class Text(Expr):
    value: str


@dataclass(frozen=True)
class Concat(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True, eq=False)
class ImageExpr(Expr):
    source: Any  # a PIL image, bytes, a path or a URL string (see image())


@dataclass(frozen=True)
class RoleBegin(Expr):
    role: str


@dataclass(frozen=True)
class RoleEnd(Expr):
    role: str


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters of one ``gen`` (``None`` = the run's default). Names follow the native API."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None

    def merged(self, defaults: GenParams) -> GenParams:
        """These parameters over ``defaults`` (a field left ``None`` here takes the default's)."""
        d = {k: v for k, v in vars(defaults).items() if v is not None}
        d.update({k: v for k, v in vars(self).items() if v is not None})
        return GenParams(**d)

    def to_native(self) -> dict[str, Any]:
        """The ``sampling_params`` dict of ``/generate`` / ``Engine.generate`` (unset fields omitted)."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class GenTools:
    """The functions a ``gen`` may call (OpenAI's chat shape) and its ``tool_choice`` (None: ``auto``)."""

    tools: tuple[dict[str, Any], ...]
    choice: str | dict[str, Any] | None = None


@dataclass(frozen=True)
class Gen(Expr):
    name: str | None
    params: GenParams = field(default_factory=GenParams)
    tools: GenTools | None = None


@dataclass(frozen=True)
class Select(Expr):
    name: str | None
    choices: tuple[str, ...]
    method: ChoicesMethod = token_length_normalized


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    repetition_penalty: float | None = None,
    ignore_eos: bool | None = None,
    seed: int | None = None,
    regex: str | None = None,
    json_schema: str | dict[str, Any] | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesMethod | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
) -> Expr:
    """Generate text into variable ``name`` (read it back as ``s[name]``).

    ``regex`` and ``json_schema`` (a dict or a JSON string) constrain the output where the server supports
    structured outputs. ``gen(name, choices=[...])`` is :func:`select`.

    ``tools`` (OpenAI's chat shape: ``{"type": "function", "function": {"name", "parameters"}}``) and
    ``tool_choice`` (``"auto"``, the default; ``"required"``; ``"none"``; or a named function) let the model call
    functions, as ``/v1/chat/completions`` does: the gen must open an assistant turn, ``s[name]`` is the text
    around the calls and ``s.tool_calls(name)`` the parsed calls.

    Example::

        >>> s += "The capital of France is" + gen("city", max_tokens=8, stop=".")  # doctest: +SKIP
        >>> s += assistant(gen("call", tools=TOOLS, tool_choice="required"))  # doctest: +SKIP
    """
    if choices is not None:
        return select(name, choices, choices_method=choices_method or token_length_normalized)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
        raise InvalidRequestError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    if regex is not None and json_schema is not None:
        raise InvalidRequestError("pass at most one of regex and json_schema", param="json_schema")
    schema = json.dumps(json_schema) if isinstance(json_schema, dict) else json_schema
    gen_tools = None
    if tools is not None or tool_choice is not None:
        parse_tool_choice(tool_choice, parse_tools(tools))  # a 400-style error now, not at run time
        gen_tools = GenTools(tuple(tools or ()), tool_choice)
    params = GenParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
        seed=seed,
        regex=regex,
        json_schema=schema,
    )
    return Gen(name, params, gen_tools)


def select(
    name: str | None = None,
    choices: list[str] | tuple[str, ...] | None = None,
    choices_method: ChoicesMethod = token_length_normalized,
) -> Expr:
    """Append the choice the model scores highest and store it in ``name``.

    Each choice is scored from the logprobs of its tokens after the current text; ``choices_method`` turns
    them into a decision (:data:`token_length_normalized` by default, :data:`greedy_token_selection`,
    :data:`unconditional_likelihood_normalized`). ``s.get_meta_info(name)`` holds the scores.

    Example::

        >>> s += "Sentiment: " + select("label", ["positive", "negative"])  # doctest: +SKIP
    """
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError("select needs a non-empty list of non-empty strings", param="choices")
    if len(set(choices)) != len(choices):
        raise InvalidRequestError("select choices must be distinct", param="choices")
    return Select(name, tuple(choices), choices_method)


def _role(role: str, content: Any = None) -> Expr:
    if content is None:  # an empty turn; open a turn with *_begin()/*_end() or ``with s.user():``
        return Concat((RoleBegin(role), RoleEnd(role)))
    return Concat((RoleBegin(role), *_parts(as_expr(content)), RoleEnd(role)))


def system(content: Any = None) -> Expr:
    """A system turn: ``s += system("You are terse.")`` (content may include ``gen``)."""
    return _role("system", content)


def user(content: Any = None) -> Expr:
    """A user turn: ``s += user("Hi")``."""
    return _role("user", content)


def assistant(content: Any = None) -> Expr:
    """An assistant turn: ``s += assistant(gen("answer", max_tokens=64))``."""
    return _role("assistant", content)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")


def image(source: Any) -> Expr:
    """An image at this place of the prompt (SGLang's ``sgl.image``): a PIL image, bytes, a path, or a ``data:``
    or ``http(s)`` URL string. The text gets the model's image placeholder; the state keeps the image and sends
    it with every later ``gen``/``select`` (forks too). Put it in a user turn to have it in ``s.messages()`` and in
    the chat APIs' requests. A model without image inputs raises
    :class:`~sgl_ray.multimodal.InvalidImageError` when it is appended; a source of another type, at once.

    Example::

        >>> s += user(image("cat.png") + "What is in the picture?")  # doctest: +SKIP
        >>> s += assistant(gen("answer", max_tokens=32))  # doctest: +SKIP
    """
    from sgl_ray.lang.images import check_image_source

    check_image_source(source)
    return ImageExpr(source)
