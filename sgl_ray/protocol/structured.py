"""OpenAI ``response_format`` and the SGLang extras (``regex``, ``ebnf``, ``json_schema``) → engine grammar fields.

``{"type": "json_object"}`` constrains the output to a JSON object; ``{"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}`` to the given schema (the schema is enforced whatever ``strict`` says);
``{"type": "text"}`` is unconstrained. ``choice`` (vLLM's ``guided_choice``) makes the output exactly one of a
list of strings, through an EBNF grammar of the alternatives.

A grammar the compiler rejects is a 400 raised under the engine's field name (``json_schema``, ``structural_tag``,
…); :func:`grammar_error_for` renames it to the request field the grammar came from (``response_format``,
``choice``, the Responses API's ``text``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import msgspec

from sgl_ray.errors import InvalidRequestError

JSON_OBJECT_SCHEMA = '{"type": "object"}'
GRAMMAR_KINDS = frozenset({"json_schema", "regex", "ebnf", "structural_tag"})
"""The engine's grammar fields (see :class:`~sgl_ray.sampling.params.SamplingParams`)."""
E = TypeVar("E", bound=BaseException)
# where in a request field its grammar is, for error messages
_GRAMMAR_PATHS = {"response_format": "response_format.json_schema.schema", "text": "text.format.schema"}


class JsonSchemaFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    name: str
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (each a JSON-escaped string literal).

    >>> print(choice_grammar(["yes", 'say "no"']))
    root ::= "yes" | "say \\"no\\""
    """
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def grammar_fields(
    response_format: ResponseFormat | None,
    json_schema: str | dict[str, Any] | None,
    regex: str | None,
    ebnf: str | None,
    choice: list[str] | None = None,
) -> dict[str, str]:
    """The ``SamplingParams`` grammar fields a request asks for (at most one); raises on a contradiction."""
    out: dict[str, str] = {}
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            out["json_schema"] = JSON_OBJECT_SCHEMA
        else:
            fmt = response_format.json_schema
            if fmt is None:
                raise InvalidRequestError(
                    "Missing required parameter: 'response_format.json_schema'.", param="response_format"
                )
            out["json_schema"] = json.dumps(fmt.schema_ if fmt.schema_ is not None else {})
    extras = {"json_schema": json_schema, "regex": regex, "ebnf": ebnf, "choice": choice}
    given: str | None = "response_format" if out else None
    for name, value in extras.items():
        if value is None:
            continue
        if given is not None:
            raise InvalidRequestError(f"'{name}' cannot be combined with '{given}'.", param=name)
        given = name
        if name == "choice":
            out["ebnf"] = choice_grammar(value)  # type: ignore[arg-type]
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def grammar_error_for(e: E, param: str | None) -> E | InvalidRequestError:
    """``e`` named for the request field ``param`` that the output grammar came from, if ``e`` is a 400 about the
    grammar under an engine field name (the compiler rejected it); else ``e`` itself.

    >>> e = InvalidRequestError('json_schema: Unsupported type "bogus"', param="json_schema")
    >>> print(grammar_error_for(e, "response_format").message)
    Invalid 'response_format.json_schema.schema': Unsupported type "bogus"
    """
    if (
        param is None
        or not isinstance(e, InvalidRequestError)
        or e.param not in GRAMMAR_KINDS
        or e.param == param
    ):
        return e
    message = e.message
    if f"'{param}'" not in message:
        message = f"Invalid '{_GRAMMAR_PATHS.get(param, param)}': " + message.removeprefix(f"{e.param}: ")
    return InvalidRequestError(message, param=param, code=e.code)


@contextmanager
def grammar_errors(param: str | None) -> Iterator[None]:
    """Raise the grammar 400s of the block as :func:`grammar_error_for` names them."""
    try:
        yield
    except InvalidRequestError as e:
        renamed = grammar_error_for(e, param)
        if renamed is e:
            raise
        raise renamed from None
