"""An ``LLMServer`` replica killed under a request: the ingress resumes the request on another replica from the
tokens already sent (greedy: exactly the tokens of an uninterrupted run), and a request it cannot resume ends with
an OpenAI-style error (an SSE error event and ``[DONE]`` when streaming), never a silent cut.

The app here is this module's own (two replicas of a tiny model under ``/resume``), so killing its replicas does not
touch the session's ``main`` app; it is deleted at the end.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai
import pytest

pytestmark = [pytest.mark.serve]

APP, PREFIX, MODEL = "resume", "/resume", "tiny"
PROMPT = [1, 1500, 2500, 3500, 4500, 5500, 6500, 7500]
LENGTH = 800  # output tokens: enough that the replica is killed while it still generates (a few ms per token)
DEADLINE_S = 60.0
RESTART_S = (
    300.0  # bound on Serve restarting a killed replica (seconds on an idle machine, minutes on a busy one)
)


@pytest.fixture(scope="module")
def resume_url(serve_url, tiny_llama_path):
    """``build_openai_app`` with two ``LLMServer`` replicas; a request may be resumed on one other replica."""
    from ray import serve

    from sgl_ray.deployments import build_openai_app

    app = build_openai_app(
        {
            "model_path": tiny_llama_path,
            "served_model_name": MODEL,
            "max_total_tokens": 4096,
            "num_replicas": 2,
            "max_request_resumes": 1,
            "request_resume_timeout_s": DEADLINE_S,
        }
    )
    serve.run(app, name=APP, route_prefix=PREFIX)
    yield f"{serve_url}{PREFIX}"
    serve.delete(APP, _blocking=False)


@pytest.fixture(scope="module")
def resume_client(resume_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{resume_url}/v1", api_key="unused", max_retries=0)


def _request(**kw) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": LENGTH, "temperature": 0, "logprobs": 0}
    return {**body, "extra_body": {"ignore_eos": True}, **kw}


@pytest.fixture(scope="module")
def reference(resume_url, hf_reference) -> str:
    """The text of an uninterrupted greedy run, its tokens checked against transformers on the same weights: at
    every position the greedy token of one forward pass over prompt + tokens."""
    import torch

    greedy = {"max_new_tokens": LENGTH, "temperature": 0, "ignore_eos": True}
    body = json.dumps({"input_ids": PROMPT, "sampling_params": greedy}).encode()
    post = urllib.request.Request(f"{resume_url}/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=DEADLINE_S) as r:
        out = json.loads(r.read())
    ids = out["output_ids"]
    assert len(ids) == LENGTH
    with torch.no_grad():
        logits = hf_reference("llama").model(torch.tensor([PROMPT + ids[:-1]])).logits[0, len(PROMPT) - 1 :]
    assert logits.argmax(-1).tolist() == ids
    return out["text"]


def _resumed(url: str) -> int:
    with urllib.request.urlopen(f"{url}/get_server_info") as r:
        return json.loads(r.read())["ingress"]["resumed_requests"]


def _replica_handles() -> dict:
    """The live ``LLMServer`` replica actors of this module's app by name (Serve names them
    ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#LLMServer#"
    handles = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(prefix):
            try:
                handles[actor["name"]] = ray.get_actor(actor["name"], namespace=actor["namespace"])
            except ValueError:  # gone meanwhile
                pass
    return handles


def _kill_serving_replica() -> None:
    """Kill the replica whose engine is running a request (exactly one request runs in this app)."""
    import ray
    from ray.exceptions import RayError

    pending: dict[str, ray.ObjectRef] = {}  # a restarted replica answers once it is initialised: ask it once
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        for name, handle in _replica_handles().items():
            ref = pending.pop(name, None) or handle.record_routing_stats.remote()
            if not ray.wait([ref], timeout=0.5)[0]:
                pending[name] = ref
                continue
            try:
                stats = ray.get(ref)
            except RayError:  # dead, or not initialised yet
                continue
            if stats.get("num_running", 0) > 0:
                ray.kill(handle, no_restart=True)
                return
        time.sleep(0.05)  # polling interval, not synchronisation
    raise AssertionError("no replica is running the request")


def _wait_for_two_replicas() -> None:
    """Both replicas up (a replica killed by an earlier test is back), so a lost request has somewhere to go."""
    from ray import serve

    def running() -> int:
        return serve.status().applications[APP].deployments["LLMServer"].replica_states.get("RUNNING", 0)

    _wait(lambda: running() == 2, "two running replicas", RESTART_S)


def _wait(predicate, what: str, bound_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + bound_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_stream_resumes_on_another_replica_with_the_same_tokens(resume_url, resume_client, reference):
    _wait_for_two_replicas()
    before = _resumed(resume_url)
    stream = resume_client.completions.create(**_request(stream=True, stream_options={"include_usage": True}))
    text, tokens = "", 0
    finish, usage, killed = None, None, False
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            tokens += len(choice.logprobs.tokens) if choice.logprobs else 0
            finish = choice.finish_reason or finish
        if tokens >= 8 and not killed:
            _kill_serving_replica()
            killed = True
    assert _resumed(resume_url) == before + 1  # the stream really was interrupted and resumed
    assert text == reference and tokens == LENGTH  # nothing repeated, nothing missing
    assert finish == "length" and usage.completion_tokens == LENGTH


def test_non_streaming_request_resumes(resume_url, resume_client, reference):
    _wait_for_two_replicas()
    before = _resumed(resume_url)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(resume_client.completions.create(**_request())))
    worker.start()
    _kill_serving_replica()
    worker.join(DEADLINE_S)
    assert not worker.is_alive() and result
    assert _resumed(resume_url) == before + 1
    (choice,) = result[0].choices
    assert choice.text == reference and len(choice.logprobs.tokens) == LENGTH
    assert choice.finish_reason == "length" and result[0].usage.completion_tokens == LENGTH


def test_a_request_that_cannot_be_resumed_ends_with_an_error_event_and_done(resume_url, resume_client):
    """It loses its replica twice (its second replica too): more than ``max_request_resumes``."""
    _wait_for_two_replicas()
    before = _resumed(resume_url)
    body = _request(stream=True, max_tokens=3000)
    lines: list[str] = []
    with resume_client.completions.with_streaming_response.create(**body) as response:
        kills = 0
        for line in response.iter_lines():
            lines.append(line)
            if kills == 0 and len(lines) > 8:
                _kill_serving_replica()
                kills = 1
            elif kills == 1 and _resumed(resume_url) == before + 1:
                _kill_serving_replica()  # the replica it was resumed on
                kills = 2
    assert kills == 2
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_lost" and error["type"] == "server_error"
    assert "could not be resumed" in error["message"]
    # every event before it is an ordinary chunk: the client got the tokens so far, then the error
    assert all("choices" in json.loads(e) for e in events[:-2])
