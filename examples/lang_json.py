"""JSON extraction with ``json_schema``: the server constrains decoding so the output parses and matches the
schema (needs a server with structured outputs).

    python examples/lang_json.py
"""

from __future__ import annotations

import json

from lang_common import make_backend, parser

import sgl_ray.lang as sgl

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
TEXTS = [
    "Maria Lopez is 34 years old and lives in Madrid, where she works as an architect.",
    "Born 51 years ago, Kenji Tanaka still lives in his home town of Osaka.",
]


@sgl.function
def extract(s, text: str, max_tokens: int):
    s += sgl.system("You extract facts about people as JSON.")
    s += sgl.user(f"Extract the name, age and city of the person.\n\n{text}")
    s += sgl.assistant(sgl.gen("person", max_tokens=max_tokens, json_schema=PERSON_SCHEMA, temperature=0))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser(__doc__).parse_args(argv)
    states = extract.run_batch(
        [{"text": t, "max_tokens": args.max_tokens} for t in TEXTS], backend=make_backend(args)
    )
    people = [json.loads(s["person"]) for s in states]
    for person in people:
        print(person)
    return people


if __name__ == "__main__":
    main()
