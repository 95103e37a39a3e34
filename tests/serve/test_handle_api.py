"""The app's Python handle API (``serve.get_app_handle(name).chat.remote(body)``): the HTTP API's bodies in and
out as dicts, streaming through ``handle.options(stream=True)``, the HTTP API's errors as ``APIError`` — from the
driver and from another deployment composed with the app (the session's Serve app, ``main``)."""

from __future__ import annotations

import httpx2 as httpx  # the official openai client's HTTP client (httpx's API)
import pytest

from .conftest import API_KEY

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "smollm2"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def app(serve_url):
    from ray import serve

    return serve.get_app_handle("main")


def test_chat_through_the_handle_is_the_http_answer(app, client):
    whole = app.chat.remote(CHAT).result()
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    http = client.chat.completions.create(**CHAT)
    assert whole["choices"][0]["message"]["content"] == http.choices[0].message.content
    assert whole["choices"][0]["finish_reason"] == http.choices[0].finish_reason
    assert whole["usage"]["completion_tokens"] == http.usage.completion_tokens
    chunks = list(
        app.options(stream=True).chat.remote(
            {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        )
    )
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_completions_generate_and_responses(app):
    body = {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0}
    whole = app.completions.remote(body).result()
    streamed = list(app.options(stream=True).completions.remote({**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in streamed) == whole["choices"][0]["text"]
    native = {"text": "1, 2, 3,", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    result = app.generate.remote(native).result()
    assert result["text"] == whole["choices"][0]["text"] and result["meta_info"]["completion_tokens"] == 4
    pieces = list(app.options(stream=True).generate.remote({**native, "stream": True}))
    assert "".join(p["text"] for p in pieces) == result["text"]
    batch = app.generate.remote({**native, "text": ["a", "b"]}).result()
    assert isinstance(batch, list) and len(batch) == 2
    response = app.responses.remote(
        {"model": MODEL, "input": "Name a color.", "max_output_tokens": 4}
    ).result()
    assert response["object"] == "response" and response["output"][0]["type"] == "message"
    events = list(  # bounded: an unbounded sampled answer may run to the context length on a CPU
        app.options(stream=True).responses.remote(
            {"model": MODEL, "input": "Hi", "stream": True, "max_output_tokens": 4}
        )
    )
    assert events[0]["type"] == "response.created" and events[-1]["type"] in (
        "response.completed",
        "response.incomplete",
    )


def test_errors_are_typed_and_match_http(app, serve_url):
    from sgl_ray.deployments import APIError

    bad = {**CHAT, "n": 0}
    with pytest.raises(APIError) as info:
        app.chat.remote(bad).result()
    http = httpx.post(
        f"{serve_url}/v1/chat/completions", json=bad, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert info.value.status_code == http.status_code == 400
    assert (
        info.value.body == http.json()
        and info.value.param == "n"
        and info.value.type == "invalid_request_error"
    )
    with pytest.raises(APIError) as info:
        app.chat.remote({**CHAT, "model": "nope"}).result()
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    with pytest.raises(
        APIError
    ) as info:  # a grammar the engine rejects, streamed: still an error, not a chunk
        list(app.options(stream=True).chat.remote({**CHAT, "stream": True, "regex": "("}))
    assert info.value.status_code == 400
    with pytest.raises(APIError) as info:
        app.generate.remote({"text": "hi", "sampling_params": {"max_new_tokens": 4, "bogus": 1}}).result()
    assert info.value.status_code == 400
    with pytest.raises(APIError) as info:
        app.completions.remote({"model": MODEL, "prompt": object()}).result()
    assert info.value.status_code == 400  # not JSON-serializable
    assert app.chat.remote(CHAT).result()["choices"]  # and it keeps serving


def test_a_composing_deployment_calls_the_app(app):
    from ray import serve

    from sgl_ray.deployments import APIError

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Composer:
        """Asks the LLM app twice (whole, then streamed) and reports its errors: model composition."""

        async def run(self, question: str) -> dict:
            llm = serve.get_app_handle("main")
            body = {**CHAT, "messages": [{"role": "user", "content": question}]}
            whole = await llm.chat.remote(body)
            stream = llm.options(stream=True).chat.remote({**body, "stream": True})
            text = "".join(
                [c["choices"][0]["delta"].get("content", "") async for c in stream if c["choices"]]
            )
            try:
                await llm.chat.remote({**body, "max_tokens": -1})
                error = None
            except APIError as e:
                error = {"status": e.status_code, "param": e.param, "body": e.body}
            return {"whole": whole["choices"][0]["message"]["content"], "streamed": text, "error": error}

    composer = serve.run(Composer.bind(), name="composer", route_prefix="/composer")
    try:
        out = composer.run.remote("What is the capital of France?").result()
    finally:
        serve.delete("composer", _blocking=False)
    assert (
        out["whole"] == out["streamed"] == app.chat.remote(CHAT).result()["choices"][0]["message"]["content"]
    )
    assert out["error"]["status"] == 400 and out["error"]["param"] == "max_tokens"
    assert out["error"]["body"]["error"]["type"] == "invalid_request_error"
