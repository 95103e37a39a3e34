"""The official ``openai`` client (sync, async, streaming) against a real Serve app on 127.0.0.1 with SmolLM2."""

from __future__ import annotations

import asyncio

import openai
import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "smollm2"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_and_health(client, serve_url):
    import urllib.request

    assert [m.id for m in client.models.list().data] == [MODEL]
    assert urllib.request.urlopen(f"{serve_url}/health").status == 200  # no key needed


def test_chat_greedy_matches_the_engine(client, smollm2_path):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # The second identical prompt reuses the cached prefix.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_n_logprobs_stop_and_seed(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        temperature=1.0,
        n=2,
        seed=7,
        logprobs=True,
        top_logprobs=3,
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.finish_reason == "stop" or len(c.logprobs.content) == 12
        assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in c.logprobs.content)
        assert "".join(e.token for e in c.logprobs.content) == c.message.content
    again = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, n=2, seed=7
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    stop = base.choices[0].text[3:6]
    cut = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == base.choices[0].text[: base.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_batch_echo_and_logprobs(client):
    r = client.completions.create(
        model=MODEL, prompt=["Hello", "The sky is"], max_tokens=4, temperature=0, logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1] and r.object == "text_completion"
    assert all(len(c.logprobs.tokens) == 4 for c in r.choices)
    echo = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=2, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("The sky is")


def test_async_client_concurrent_requests(aclient):
    async def main():
        prompts = [f"Count from {i} to {i + 3}:" for i in range(6)]
        rs = await asyncio.gather(
            *(aclient.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0) for p in prompts)
        )
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, stream=True
        )
        parts = [c async for c in stream]
        return rs, parts

    rs, parts = asyncio.run(main())
    assert all(r.usage.completion_tokens == 8 for r in rs)
    assert parts and parts[-1].choices[0].finish_reason in ("length", "stop")


def test_wrong_key_is_rejected(serve_url):
    bad = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_client_disconnect_aborts_the_request(client, serve_url):
    import re
    import time
    import urllib.request

    def running() -> int:
        req = urllib.request.Request(f"{serve_url}/metrics", headers={"Authorization": "Bearer test-key"})
        text = urllib.request.urlopen(req).read().decode()
        return int(float(re.search(r"^sgl_ray_num_running_requests (\S+)$", text, re.M).group(1)))

    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert running() == 1
    stream.close()  # the client walks away mid-generation
    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0  # aborted, KV freed, long before 3000 tokens
