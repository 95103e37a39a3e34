"""Structured outputs through the module Serve app with the official ``openai`` client and native ``/generate``."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import jsonschema
import openai
import pytest

from .conftest import API_KEY

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "smollm2"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Give me a user record as JSON."}]


def test_response_format_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=64, temperature=0, response_format=fmt
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=64, temperature=0, response_format=fmt, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].message.content
    obj = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=64, temperature=0, response_format={"type": "json_object"}
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # a free-form object may not close within max_tokens; it is still an object so far
        assert obj.choices[0].message.content.startswith("{")


def test_extra_body_regex_on_completions(client):
    rx = r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r = client.completions.create(
        model=MODEL, prompt="Today's date is ", max_tokens=16, temperature=0, extra_body={"regex": rx}
    )
    assert re.fullmatch(rx, r.choices[0].text) and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_schema_is_a_400_and_the_server_keeps_serving(client, stream):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/definitions/missing"}}}
    with pytest.raises(openai.BadRequestError) as err:
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=8, response_format=bad, stream=stream
        )
        list(r) if stream else None
    assert "json_schema" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"regex": "a(b"})
    ok = client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_native_generate_with_json_schema(serve_url):
    body = {
        "text": "A user record as JSON:\n",
        "sampling_params": {"temperature": 0, "max_new_tokens": 64, "json_schema": json.dumps(PERSON)},
    }
    req = urllib.request.Request(
        f"{serve_url}/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    out = json.loads(urllib.request.urlopen(req).read())
    jsonschema.validate(json.loads(out["text"]), PERSON)
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] == "stop"
    assert meta["decode_steps"] + meta["jump_forward_tokens"] == meta["completion_tokens"]
    assert meta["jump_forward_tokens"] > 0
    body["sampling_params"]["regex"] = "a"
    bad = urllib.request.Request(req.full_url, data=json.dumps(body).encode(), headers=req.headers)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad)
    assert err.value.code == 400
