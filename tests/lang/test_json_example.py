"""The JSON-extraction example: ``gen(json_schema=...)`` must give output that parses and matches the schema.

It needs structured outputs on the server (the ``json_schema`` sampling parameter)."""

from __future__ import annotations

import jsonschema
import pytest

pytestmark = [pytest.mark.serve, pytest.mark.ray]


def test_json_example_outputs_match_the_schema(load_example, serve_url):
    from ..conftest import API_KEY

    module = load_example("lang_json")
    # main() json.loads every output
    people = module.main(["--url", serve_url, "--api-key", API_KEY, "--max-tokens", "64"])
    assert len(people) == len(module.TEXTS)
    for person in people:
        jsonschema.validate(person, module.PERSON_SCHEMA)  # object, required fields, types, no extra keys
        assert person["name"].strip() and person["city"].strip()
