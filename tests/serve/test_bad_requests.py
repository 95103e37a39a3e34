"""Every bad request gets a 4xx with an OpenAI-style error body, and the server keeps serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from .conftest import API_KEY

pytestmark = [pytest.mark.serve, pytest.mark.slow]

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
BOGUS = {"name": "out", "schema": {"type": "bogus"}}  # valid JSON, but no JSON schema
BOGUS_TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": "x"}},
}


def _post(url: str, body: bytes, key: str | None = API_KEY) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


BAD = [
    (CHAT, b"{not json", 400, None),
    (CHAT, b"\xff\xfe\xfa", 400, None),
    (CHAT, _j({"model": "smollm2"}), 400, "messages"),
    (CHAT, _j({"model": "smollm2", "messages": "hi"}), 400, "messages"),
    (CHAT, _j({"model": "nope", "messages": MSG}), 404, "model"),
    (CHAT, _j({"model": "smollm2", "messages": MSG, "max_tokens": -5}), 400, "max_tokens"),
    (CHAT, _j({"model": "smollm2", "messages": MSG, "max_tokens": 10**9}), 400, "max_tokens"),
    (CHAT, _j({"model": "smollm2", "messages": MSG, "temperature": "hot"}), 400, "temperature"),
    (CHAT, _j({"model": "smollm2", "messages": MSG, "n": 0}), 400, "n"),
    (CHAT, _j({"model": "smollm2", "messages": MSG, "n": 1000}), 400, "n"),
    (CHAT, _j({"model": "smollm2", "messages": MSG, "top_logprobs": 3}), 400, "top_logprobs"),
    (
        CHAT,
        _j({"model": "smollm2", "messages": MSG, "logprobs": True, "top_logprobs": 99}),
        400,
        "top_logprobs",
    ),
    (CHAT, _j({"model": "smollm2", "messages": MSG, "stop": [""]}), 400, "stop"),
    (CHAT, _j({"model": "smollm2", "messages": MSG, "stop": ["a"] * 40}), 400, "stop"),
    (
        CHAT,
        _j({"model": "smollm2", "messages": MSG, "stop": ["a", "x" * 5000]}),
        400,
        "stop",
    ),  # past the length cap
    (CHAT, _j({"model": "smollm2", "messages": MSG, "top_k": 2**70}), 400, "top_k"),  # past int64
    (CHAT, _j({"model": "smollm2", "messages": MSG, "priority": -(2**70)}), 400, "priority"),
    (CHAT, _j({"model": "smollm2", "messages": [{"role": "user", "content": "x " * 9000}]}), 400, "messages"),
    (COMP, _j({"model": "smollm2", "prompt": "hi", "logprobs": 50}), 400, "logprobs"),
    (COMP, _j({"model": "smollm2", "prompt": [10**9]}), 400, "prompt"),
    (COMP, _j({"model": "smollm2", "prompt": "hi", "suffix": "x"}), 400, "suffix"),
    ("/v1/nowhere", _j({}), 404, None),
    ("/v1/responses/resp_123/cancel", _j({}), 404, None),  # stateless: no stored response to act on
    (
        "/v1/responses",
        _j({"model": "smollm2", "input": [{"type": "reasoning", "summary": []}]}),
        400,
        "input",
    ),
    ("/generate", _j({"text": "hi", "sampling_params": {"temperature": -1}}), 400, "temperature"),
    ("/generate", _j({"text": "hi", "sampling_params": {"top_k": 2**70}}), 400, "top_k"),
    ("/generate", _j({"text": "hi", "sampling_params": {"stop": "x" * 5000}}), 400, "stop"),
    (
        "/generate",
        _j({"text": "hi", "return_logprob": True, "logprob_start_len": 2**70}),
        400,
        "logprob_start_len",
    ),
    ("/generate", _j({"text": "hi", "priority": 2**70}), 400, "priority"),
    ("/generate", _j({"text": "hi", "sampling_params": {"max_tokenz": 4}}), 400, None),  # unknown key
    (
        "/generate",
        _j({"text": "hi", "sampling_params": {"max_tokens": 4, "max_new_tokens": 5}}),
        400,
        "max_tokens",
    ),
    # streamed: refused before the stream starts, not an error event inside a 200
    (COMP, _j({"model": "smollm2", "prompt": "", "stream": True}), 400, "prompt"),  # encodes to no tokens
    ("/generate", _j({"text": "", "stream": True}), 400, "text"),
    (
        "/generate",
        _j({"text": "hi", "stream": True, "sampling_params": {"stop_token_ids": [10**9]}}),
        400,
        "stop_token_ids",
    ),
    # a grammar the compiler rejects names the field it came from
    (
        CHAT,
        _j(
            {
                "model": "smollm2",
                "messages": MSG,
                "response_format": {"type": "json_schema", "json_schema": BOGUS},
            }
        ),
        400,
        "response_format",
    ),
    (
        "/v1/responses",
        _j({"model": "smollm2", "input": "hi", "text": {"format": {"type": "json_schema", **BOGUS}}}),
        400,
        "text",
    ),
    (
        CHAT,
        _j({"model": "smollm2", "messages": MSG, "tools": [BOGUS_TOOL], "tool_choice": "required"}),
        400,
        "tools",
    ),
    (
        CHAT,
        _j({"model": "smollm2", "messages": MSG, "chat_template_kwargs": {"messages": []}}),
        400,
        "chat_template_kwargs",
    ),
    (CHAT, b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    ("/generate", _j({"text": "hi", "lora_path": "nope"}), 404, "lora_path"),
    ("/v1/load_lora_adapter", _j({"lora_name": 5, "lora_path": "x"}), 400, "lora_name"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_request_gets_openai_error_and_server_survives(serve_url, path, body, status, param):
    code, payload = _post(serve_url + path, body)
    assert code == status
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert ".cc:" not in err["message"] and "Traceback" not in err["message"], err  # no internals
    if param is not None:
        assert err["param"] == param
    ok, good = _post(serve_url + CHAT, _j({"model": "smollm2", "messages": MSG, "max_tokens": 2}))
    assert ok == 200 and good["choices"][0]["message"]["role"] == "assistant"


def test_generate_names_a_sampling_param_alike_for_every_kind_of_error(serve_url):
    """A wrong type, a wrong value and an id outside the vocabulary (checked with the model) all name the field."""
    bodies = [
        {"stop_token_ids": "x"},  # type
        {"stop_token_ids": [-1]},  # value
        {"stop_token_ids": [10**9]},  # outside the vocabulary
    ]
    for sampling_params in bodies:
        code, payload = _post(serve_url + "/generate", _j({"text": "hi", "sampling_params": sampling_params}))
        err = payload["error"]
        assert code == 400 and err["param"] == "stop_token_ids", err
        assert err["message"].startswith(
            ("Invalid 'sampling_params.", "Invalid type for 'sampling_params.")
        ), err


def test_missing_key_and_oversized_body(serve_url):
    assert _post(serve_url + CHAT, _j({"model": "smollm2", "messages": MSG}), key=None)[0] == 401
    code, payload = _post(
        serve_url + CHAT, b'{"model": "smollm2", "messages": [], "x": "' + b"a" * (2 * 2**20) + b'"}'
    )
    assert code == 413 and payload["error"]["type"] == "invalid_request_error", payload
