"""JSON schemas, regexes and grammars used by the structured-output tests (bounded so that a 135M model's greedy
output completes within a few dozen tokens)."""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SHORT = {"type": "string", "maxLength": 8}


def obj(required: dict, optional: dict | None = None) -> dict:
    props = {**required, **(optional or {})}
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


# (description for the prompt, schema)
SCHEMAS: list[tuple[str, dict]] = [
    ("a person", obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a city", obj({"city": NAME, "country": {"type": "string", "enum": ["France", "Japan", "Brazil"]}})),
    ("a yes/no answer", obj({"answer": {"type": "boolean"}})),
    (
        "a color",
        obj({"color": {"enum": ["red", "green", "blue"]}, "hex": {"type": "string", "maxLength": 7}}),
    ),
    ("a score", obj({"score": {"type": "integer", "minimum": 1, "maximum": 10}})),
    ("a temperature", obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60}})),
    ("tags", obj({"tags": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3}})),
    (
        "numbers",
        obj(
            {
                "values": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 99},
                    "maxItems": 4,
                }
            }
        ),
    ),
    ("an address", obj({"address": obj({"street": NAME, "zip": {"type": "string", "pattern": "[0-9]{5}"}})})),
    ("a book", obj({"title": NAME, "author": obj({"first": SHORT, "last": SHORT})})),
    ("a user with an optional email", obj({"user": NAME}, {"email": {"type": "string", "maxLength": 20}})),
    (
        "a pet",
        obj({"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 4}}),
    ),
    ("an id", obj({"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, SHORT]}})),
    (
        "a status",
        obj({"status": {"const": "ok"}, "code": {"type": "integer", "minimum": 100, "maximum": 599}}),
    ),
    (
        "a point",
        obj(
            {
                "x": {"type": "integer", "minimum": -9, "maximum": 9},
                "y": {"type": "integer", "minimum": -9, "maximum": 9},
            }
        ),
    ),
    (
        "a product",
        obj(
            {
                "product": NAME,
                "price": {"type": "number", "minimum": 0, "maximum": 1000},
                "in_stock": {"type": "boolean"},
            }
        ),
    ),
    (
        "a list of people",
        obj(
            {
                "people": {
                    "type": "array",
                    "maxItems": 2,
                    "items": obj({"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 99}}),
                }
            }
        ),
    ),
    (
        "a date",
        obj(
            {
                "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                "month": {"type": "integer", "minimum": 1, "maximum": 12},
            }
        ),
    ),
    ("a nullable note", obj({"note": {"anyOf": [SHORT, {"type": "null"}]}})),
    (
        "a matrix",
        obj(
            {
                "rows": {
                    "type": "array",
                    "maxItems": 2,
                    "items": {
                        "type": "array",
                        "maxItems": 2,
                        "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    },
                }
            }
        ),
    ),
    ("a language", obj({"language": {"enum": ["Python", "Rust", "Go"]}, "typed": {"type": "boolean"}})),
    (
        "a weather report",
        obj(
            {
                "sky": {"enum": ["sunny", "cloudy", "rainy"]},
                "wind": obj(
                    {
                        "speed": {"type": "integer", "minimum": 0, "maximum": 200},
                        "direction": {"enum": ["N", "E", "S", "W"]},
                    }
                ),
            }
        ),
    ),
    (
        "a movie",
        obj(
            {"movie": NAME, "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
            {"genre": {"enum": ["drama", "comedy"]}},
        ),
    ),
    ("a bare string", {"type": "string", "maxLength": 16}),
]

REGEXES: list[tuple[str, str]] = [
    ("A US phone number:", r"\(\d{3}\) \d{3}-\d{4}"),
    ("An email address:", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)"),
    ("A date:", r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"),
    ("The answer (yes or no):", r"(yes|no)"),
    ("An IPv4 address:", r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)"),
    ("A capitalised word:", r"[A-Z][a-z]{1,10}"),
]

EBNF_ARITHMETIC = r"""
root ::= expr
expr ::= term (op term)? (op term)?
term ::= num | "(" num op num ")"
op ::= " + " | " - "
num ::= [1-9] [0-9]?
"""
