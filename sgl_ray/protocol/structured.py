"""OpenAI ``response_format`` and the SGLang extras (``regex``, ``ebnf``, ``json_schema``) → engine grammar fields.

``{"type": "json_object"}`` constrains the output to a JSON object; ``{"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}`` to the given schema (the schema is enforced whatever ``strict`` says);
``{"type": "text"}`` is unconstrained. ``choice`` (vLLM's ``guided_choice``) makes the output exactly one of a
list of strings, through an EBNF grammar of the alternatives.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

from sgl_ray.errors import InvalidRequestError

JSON_OBJECT_SCHEMA = '{"type": "object"}'


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
