"""SGLang's and vLLM's API details against the session's Serve app (SmolLM2): ``GET /v1/models/{id}`` and
``max_model_len``, ``/health_generate``, ``/detokenize``, ``/get_server_info``, ``/abort_request``, ``matched_stop``,
``continue_final_message``, ``stream_options.continuous_usage_stats``, ``choice``, ``stop_regex``,
``prompt_logprobs`` and ``priority``."""

from __future__ import annotations

import json
import re
import threading

import httpx2 as httpx  # the official openai client's HTTP client (httpx's API)
import openai
import pytest

from .conftest import API_KEY

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "smollm2"
EOS = 2  # SmolLM2's <|im_end|>
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def http(serve_url):
    with httpx.Client(base_url=serve_url, headers=AUTH, timeout=120) as c:
        yield c


def test_models_by_id_and_max_model_len(client, http):
    context = http.get("/get_model_info").json()["context_length"]
    (card,) = client.models.list().data
    assert card.id == MODEL and card.max_model_len == context
    one = client.models.retrieve(MODEL)
    assert one.id == MODEL and one.max_model_len == context and one.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert http.get("/v1/models/nope", headers={"Authorization": ""}).status_code == 401


def test_health_generate_and_server_info(http, serve_url):
    assert httpx.get(f"{serve_url}/health_generate", timeout=60).status_code == 200  # a probe: no key needed
    info = http.get("/get_server_info")
    assert info.status_code == 200 and API_KEY not in info.text
    body = info.json()
    assert body["served_model_name"] == MODEL and body["max_total_tokens"] == 16384
    assert body["context_length"] == http.get("/get_model_info").json()["context_length"]
    assert body["version"] and body["internal_states"][0]["kv_capacity"] > 0 and len(body["models"]) == 1


def test_detokenize(http):
    tokens = http.post("/tokenize", json={"text": ["Hello world", "Paris"]}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": tokens[0]}).json() == {"text": "Hello world"}
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"text": ["Hello world", "Paris"]}
    special = http.post(
        "/detokenize", json={"tokens": [1, *tokens[1], 2], "skip_special_tokens": False}
    ).json()
    assert special["text"] == "<|im_start|>Paris<|im_end|>"
    for bad in ({"tokens": [10**9]}, {"tokens": [1, [2]]}, {"tokens": "x"}, {}):
        r = http.post("/detokenize", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("tokens", None), bad


def test_abort_request_by_rid(http, client):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}
    first_chunk = threading.Event()
    events: list[dict] = []

    def read() -> None:
        with http.stream("POST", "/v1/chat/completions", json={**body, "rid": "abort-me"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append({"done": True} if line == "data: [DONE]" else json.loads(line[6:]))
                    first_chunk.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first_chunk.wait(60)
    duplicate = http.post("/v1/chat/completions", json={**body, "stream": False, "rid": "abort-me"})
    assert duplicate.status_code == 400 and duplicate.json()["error"]["param"] == "rid"
    assert http.post("/abort_request", json={"rid": "abort-me"}).json() == {"aborted": 1}
    reader.join(60)
    assert events[-1] == {"done": True}
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert finishes[-1] == "abort" and finishes.count(None) == len(finishes) - 1
    assert http.post("/abort_request", json={"rid": "abort-me"}).json() == {"aborted": 0}
    assert http.post("/abort_request", json={}).status_code == 400
    # /generate: the rid is the result's id; a whole (not streamed) request ends with what it had
    done = threading.Event()
    result: dict = {}

    def generate() -> None:
        params = {"max_new_tokens": 400, "ignore_eos": True}
        native = {"text": "Once upon a time", "rid": "gen-1", "sampling_params": params}
        result.update(http.post("/generate", json=native).json())
        done.set()

    threading.Thread(target=generate).start()
    for _ in range(200):
        if http.post("/abort_request", json={"rid": "gen-1"}).json()["aborted"]:
            break
        done.wait(0.05)
    assert done.wait(60)
    assert result["meta_info"]["id"] == "gen-1" and result["meta_info"]["finish_reason"]["type"] == "abort"
    assert result["meta_info"]["completion_tokens"] < 400
    assert client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=2
    ).choices  # still serving


def test_matched_stop(client, http):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].matched_stop == EOS
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].matched_stop is None
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0)
    stop = base.choices[0].text[3:6]
    cut = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stop=[stop]
    )
    assert cut.choices[0].matched_stop == stop
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stop=[stop], stream=True
        )
    )
    assert [c.choices[0].matched_stop for c in chunks if c.choices[0].finish_reason] == [stop]
    native = {
        "text": "1, 2, 3, 4,",
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "stop": stop},
    }
    meta = http.post("/generate", json=native).json()["meta_info"]
    assert meta["matched_stop"] == stop and meta["finish_reason"]["matched"] == stop


def test_stop_regex(client, http):
    prompt = "1, 2, 3, 4,"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    for pattern in ("[0-9]+", ", [0-9]"):  # unbounded, and bounded (held back, so the cut is exact)
        first = re.search(pattern, base)
        assert first is not None
        r = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"stop_regex": pattern}
        )
        assert r.choices[0].text == base[: first.start()], pattern
        assert r.choices[0].finish_reason == "stop" and r.choices[0].matched_stop == pattern
    native = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "stop_regex": ", [0-9]"},
    }
    assert http.post("/generate", json=native).json()["meta_info"]["matched_stop"] == ", [0-9]"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "stop_regex": "("})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_regex"


def test_continue_final_message(client):
    from sgl_ray.model_loader import default_model_path, load_tokenizer, resolve_model
    from sgl_ray.protocol import render_chat

    messages = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    tokenizer = load_tokenizer(resolve_model(str(default_model_path())))
    ids = render_chat(tokenizer, messages, False, continue_final_message=True)
    assert tokenizer.decode(ids).endswith("The capital of France is")
    same = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == same.choices[0].text and "Paris" in same.choices[0].text
    with pytest.raises(openai.BadRequestError):  # the last message must be the assistant's
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=4, extra_body={"continue_final_message": True}
        )


def test_continuous_usage_stats(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    assert all(c.usage is not None for c in chunks)
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done) and done[-1] == 6 and chunks[-1].choices == []
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks[1:])
    plain = list(
        client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens == 3


def test_choice(client, http):
    options = ["Berlin", "Paris", "London, UK"]
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, extra_body={"choice": options}, temperature=1.0, n=3
    )
    assert all(c.message.content in options for c in r.choices)
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=16, extra_body={"guided_choice": options}
    )
    assert r.choices[0].text in options
    for extra, param in (
        ({"choice": options, "guided_choice": options}, "guided_choice"),
        ({"choice": []}, "choice"),
        ({"choice": options, "regex": "a+"}, "choice"),
    ):
        bad = http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, **extra})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, extra


def test_prompt_logprobs(client, http):
    prompt = "The capital of France is"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    entries = r.choices[0].prompt_logprobs
    ids = http.post("/tokenize", json={"text": prompt}).json()["tokens"]
    assert len(entries) == len(ids) and entries[0] is None
    native = {
        "input_ids": ids,
        "return_logprob": True,
        "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 1},
    }
    reference = http.post("/generate", json=native).json()["meta_info"]["input_token_logprobs"]
    for pos in range(1, len(ids)):
        entry = entries[pos][str(ids[pos])]
        assert entry["logprob"] == pytest.approx(reference[pos][0], abs=1e-4)
        assert entry["decoded_token"] and (entry["rank"] is None or 1 <= entry["rank"] <= 2)
        assert 2 <= len(entries[pos]) <= 3 and all(e["logprob"] <= 0 for e in entries[pos].values())
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 2}
        )
    )
    (sent,) = [
        c.choices[0].prompt_logprobs for c in streamed if getattr(c.choices[0], "prompt_logprobs", None)
    ]
    assert sent[0] is None and [set(e) for e in sent[1:]] == [set(e) for e in entries[1:]]
    for mine, theirs in zip(sent[1:], entries[1:], strict=True):
        assert all(mine[k]["logprob"] == pytest.approx(theirs[k]["logprob"], abs=1e-4) for k in mine)
    bad = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "prompt_logprobs": 99})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_logprobs"


def test_priority_is_accepted_and_typed(client, http):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=2, extra_body={"priority": 5}
    )
    assert r.choices[0].finish_reason == "length"
    native = {"text": "Hi", "priority": -3, "sampling_params": {"max_new_tokens": 2}}
    assert http.post("/generate", json=native).status_code == 200
    bad = http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "priority": "high"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
