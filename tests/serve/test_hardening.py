"""Hardening of the HTTP front (issue 34): deep JSON, big requests off the event loop, per-request size limits,
client chat templates, ``/generate``'s token budget, and JSON-only bodies. Every refused request is a 4xx in the
OpenAI error shape, and the server keeps serving after it.

Most tests use the session app (default limits); ``strict_url`` is a second ingress, with small limits and request
chat templates trusted, in front of the session app's ``LLMServer`` (no second engine)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import API_KEY

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MSG = [{"role": "user", "content": "hi"}]
JSON_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/generate",
    "/tokenize",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)


def _post(
    url: str, body: bytes | dict, key: str | None = API_KEY, content_type: str | None = "application/json"
) -> tuple[int, dict]:
    """POST over ``http.client``, which (unlike urllib) sends no Content-Type unless told to."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        conn.request("POST", parts.path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _error(code: int, payload: dict, status: int) -> dict:
    assert code == status, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def _still_serving(url: str, key: str | None = API_KEY) -> None:
    code, out = _post(
        url + "/v1/chat/completions", {"model": "smollm2", "messages": MSG, "max_tokens": 2}, key
    )
    assert code == 200 and out["usage"]["completion_tokens"] == 2, out


@pytest.fixture(scope="module")
def context_length(serve_url) -> int:
    req = urllib.request.Request(
        f"{serve_url}/get_model_info", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())["context_length"]


@pytest.fixture(scope="module")
def strict_url(serve_url, smollm2_path):
    """An ingress with small limits that trusts request chat templates, routed to the session's LLM server."""
    from ray import serve

    from sgl_ray.deployments.ingress import OpenAIIngress

    server = serve.get_deployment_handle("LLMServer", app_name="main")
    config = {
        "model_path": smollm2_path,
        "served_model_name": "smollm2",
        "trust_request_chat_template": True,
        "max_prompt_chars": 2000,
        "max_message_chars": 1000,
        "max_sequences_per_request": 4,
        "tokenizer_threads": 1,
    }
    ingress = serve.deployment(OpenAIIngress, name="StrictIngress").options(ray_actor_options={"num_cpus": 0})
    serve.run(ingress.bind(server, config), name="strict", route_prefix="/strict")
    yield f"{serve_url}/strict"
    serve.delete("strict")


# --- 1. deep JSON ---------------------------------------------------------------------------------------------------


def _deep_bodies(depth: int) -> list[bytes]:
    arrays = b"[" * depth + b"]" * depth
    objects = b'{"a":' * depth + b"1" + b"}" * depth
    return [
        b'{"extra": ' + arrays + b"}",  # an unknown field
        b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": '
        + objects
        + b"}}",  # a free-form field
    ]


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_json_nested_2000_deep_is_a_400(serve_url, route):
    for body in _deep_bodies(2000):
        err = _error(*_post(serve_url + route, body), 400)
        assert "nested too deeply" in err["message"] and err["code"] == "json_too_deep"
    _still_serving(serve_url)


def test_free_form_values_deeper_than_the_limit_are_400s(serve_url):
    from sgl_ray.protocol import MAX_JSON_DEPTH

    schema = {"type": "object"}  # a JSON schema nested past the limit, yet within what the decoder follows
    for _ in range(MAX_JSON_DEPTH):
        schema = {"type": "object", "properties": {"a": schema}}
    deep_tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    cases = [
        ("/v1/chat/completions", {"model": "smollm2", "messages": MSG, "tools": [deep_tool]}),
        ("/generate", {"text": "hi", "sampling_params": {"json_schema": schema}}),
        (
            "/v1/responses",
            {"model": "smollm2", "input": "hi", "tools": [deep_tool["function"] | {"type": "function"}]},
        ),
    ]
    for route, body in cases:
        err = _error(*_post(serve_url + route, body), 400)
        assert err["code"] == "json_too_deep", err
    # nested past Python's own limit inside a string that the engine parses later: the grammar's compile fails
    deep_string = "[" * 2000 + "]" * 2000
    body = {"text": "hi", "sampling_params": {"json_schema": deep_string, "max_new_tokens": 2}}
    _error(*_post(serve_url + "/generate", body), 400)
    _still_serving(serve_url)


# --- 2. big requests off the event loop, size limits ----------------------------------------------------------------


def test_health_answers_while_big_requests_are_tokenized(serve_url, context_length):
    """Seven prompts at the size limit for /tokenize and three chat messages at it (each tokenizes past the context:
    a 400 after the work) keep the ingress's tokenizer threads busy for a second or more; /health, asked again and
    again meanwhile, answers each time in a small fraction of that."""
    limit = 16 * context_length
    text = ("The quick brown fox jumps over the lazy dog; " * (limit // 40 + 1))[:limit]
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    with ThreadPoolExecutor(4) as pool:
        started = time.perf_counter()
        big = [pool.submit(_post, f"{serve_url}/tokenize", {"text": [text] * 7})]
        big += [pool.submit(_post, f"{serve_url}/v1/chat/completions", chat) for _ in range(3)]
        waits = []
        while not all(f.done() for f in big):
            t = time.perf_counter()
            assert urllib.request.urlopen(f"{serve_url}/health", timeout=60).status == 200
            waits.append(time.perf_counter() - t)
        busy = time.perf_counter() - started
        results = [f.result() for f in big]
    code, out = results[0]
    assert code == 200 and len(out["tokens"]) == 7 and len(out["tokens"][0]) > context_length
    for code, out in results[1:]:
        assert _error(code, out, 400)["code"] == "context_length_exceeded"
    # on the event loop, one /health would have waited for most of the tokenizing
    assert len(waits) >= 3 and max(waits) < busy / 3, (busy, sorted(waits)[-3:])
    _still_serving(serve_url)


def test_size_limits_name_the_option(serve_url, strict_url, context_length):
    over = "a " * (8 * context_length) + "b"  # one character past the default max_prompt_chars
    err = _error(*_post(f"{serve_url}/v1/completions", {"model": "smollm2", "prompt": over}), 400)
    assert "max_prompt_chars" in err["message"] and err["param"] == "prompt"
    err = _error(*_post(f"{serve_url}/generate", {"text": ["hi", over]}), 400)
    assert "max_prompt_chars" in err["message"] and err["param"] == "text"
    # the strict ingress: 2,000 characters per prompt, 1,000 per message
    err = _error(*_post(f"{strict_url}/tokenize", {"text": "x" * 2001}, key=None), 400)
    assert "max_prompt_chars" in err["message"]
    assert _post(f"{strict_url}/tokenize", {"text": "x" * 2000}, key=None)[0] == 200
    one = {"model": "smollm2", "messages": [{"role": "user", "content": "y" * 1001}]}
    err = _error(*_post(f"{strict_url}/v1/chat/completions", one, key=None), 400)
    assert "max_message_chars" in err["message"] and err["param"] == "messages"
    three = {"model": "smollm2", "messages": [{"role": "user", "content": "y" * 700}] * 3, "max_tokens": 1}
    err = _error(*_post(f"{strict_url}/v1/chat/completions", three, key=None), 400)
    assert "max_prompt_chars" in err["message"]
    _still_serving(strict_url, key=None)


# --- 3. client chat templates ---------------------------------------------------------------------------------------


def test_request_chat_template_is_off_unless_trusted(serve_url, strict_url):
    template = {"chat_template": "{{ messages[0]['content'] }}"}
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 1}
    err = _error(*_post(f"{serve_url}/v1/chat/completions", body | {"chat_template_kwargs": template}), 400)
    assert "--trust-request-chat-template" in err["message"] and err["param"] == "chat_template_kwargs"
    err = _error(*_post(f"{serve_url}/v1/responses", {"input": "hi", "chat_template_kwargs": template}), 400)
    assert "--trust-request-chat-template" in err["message"]
    for reserved in ({"tokenize": False}, {"truncation": True, "max_length": 4}):
        err = _error(
            *_post(f"{serve_url}/v1/chat/completions", body | {"chat_template_kwargs": reserved}), 400
        )
        assert "not a template variable" in err["message"]
    _still_serving(serve_url)
    # a server that trusts request templates renders with the client's
    code, out = _post(
        f"{strict_url}/v1/chat/completions", body | {"chat_template_kwargs": template}, key=None
    )
    assert code == 200, out
    expected = _post(f"{strict_url}/tokenize", {"text": "hello world"}, key=None)[1]["tokens"]
    assert out["usage"]["prompt_tokens"] == len(expected)


# --- 6. prompts × n, /generate's token budget -----------------------------------------------------------------------


def test_sequences_per_request_are_capped(strict_url):
    cases = [  # (route, body, param) at 4 sequences per request
        ("/v1/completions", {"model": "smollm2", "prompt": ["a", "b"], "n": 3, "max_tokens": 1}, "prompt"),
        ("/v1/chat/completions", {"model": "smollm2", "messages": MSG, "n": 5, "max_tokens": 1}, "n"),
        ("/generate", {"text": ["a"] * 5, "sampling_params": {"max_new_tokens": 1}}, "sampling_params"),
        ("/generate", {"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 3}]}, "sampling_params"),
    ]
    for route, body, param in cases:
        err = _error(*_post(strict_url + route, body, key=None), 400)
        assert "max_sequences_per_request" in err["message"] and err["param"] == param, err
    code, out = _post(
        f"{strict_url}/generate",
        {"text": ["a", "b"], "sampling_params": {"n": 2, "max_new_tokens": 1}},
        key=None,
    )
    assert code == 200 and len(out) == 4


def test_generate_checks_max_new_tokens_against_the_context(serve_url, context_length):
    ids = [42] * (context_length - 100)
    err = _error(
        *_post(f"{serve_url}/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 101}}), 400
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_new_tokens"
    # the default max_new_tokens (128) counts too, per prompt of a batch
    err = _error(*_post(f"{serve_url}/generate", {"input_ids": [[42, 43], ids]}), 400)
    assert err["code"] == "context_length_exceeded"
    code, out = _post(
        f"{serve_url}/generate", {"input_ids": ids[:50], "sampling_params": {"max_new_tokens": 2}}
    )
    assert code == 200 and out["meta_info"]["completion_tokens"] == 2


# --- 7. JSON bodies only --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_json_routes_refuse_other_content_types(serve_url, route):
    body = json.dumps({"model": "smollm2", "messages": MSG, "prompt": "hi", "text": "hi"}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        err = _error(*_post(serve_url + route, body, content_type=content_type), 415)
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    _still_serving(serve_url)


def test_json_content_type_with_parameters_is_accepted(serve_url):
    body = {"model": "smollm2", "messages": MSG, "max_tokens": 2}
    code, out = _post(
        f"{serve_url}/v1/chat/completions", body, content_type="application/json; charset=utf-8"
    )
    assert code == 200 and out["usage"]["completion_tokens"] == 2


# --- the options from the command line ------------------------------------------------------------------------------


def test_cli_flags_reach_the_app_and_bad_values_stop_the_build(smollm2_path):
    from sgl_ray.cli import build_parser
    from sgl_ray.deployments import build_openai_app
    from sgl_ray.deployments.serve_cli import app_args
    from sgl_ray.errors import InvalidRequestError

    flags = ["--trust-request-chat-template", "--max-prompt-chars", "100", "--max-message-chars", "50"]
    flags += ["--max-sequences-per-request", "8", "--tokenizer-threads", "3", "--lora-allow-pickle"]
    args = app_args(build_parser().parse_args(["serve", "--model-path", smollm2_path, *flags]))
    assert args["trust_request_chat_template"] is True and args["lora_allow_pickle"] is True
    assert (args["max_prompt_chars"], args["max_message_chars"], args["max_sequences_per_request"]) == (
        100,
        50,
        8,
    )
    assert args["tokenizer_threads"] == 3
    build_openai_app(args)
    defaults = app_args(build_parser().parse_args(["serve"]))
    assert not {"trust_request_chat_template", "max_prompt_chars", "lora_allow_pickle"} & set(defaults)
    for bad in ({"max_sequences_per_request": 0}, {"max_prompt_chars": -1}, {"tokenizer_threads": 0}):
        with pytest.raises(InvalidRequestError):
            build_openai_app({"model_path": smollm2_path, **bad})


def test_a_request_the_engine_refuses_ends_the_replica_stream_as_a_value(serve_url):
    """A 4xx the engine raises comes back from the replica as a ``Rejected`` item, not a raised exception (which
    Serve logs with a traceback at ERROR and counts as a failed request); the ingress still answers with it."""
    from ray import serve

    from sgl_ray.deployments.running import Rejected
    from sgl_ray.sampling.params import SamplingParams

    server = serve.get_deployment_handle("LLMServer", app_name="main")
    payload = {
        "prompts": [[1, 2, 3]],
        "sampling_params": SamplingParams(max_new_tokens=2),
        "lora_name": "nope",
    }
    items = list(server.options(stream=True).generate.remote(payload))
    assert len(items) == 1 and isinstance(items[0], Rejected), items
    assert items[0].error.status_code == 400 and items[0].error.param == "lora_path"
    ok = list(server.options(stream=True).generate.remote({**payload, "lora_name": None}))
    assert ok and ok[-1][1].finished  # the replica keeps serving
