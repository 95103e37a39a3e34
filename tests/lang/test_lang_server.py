"""The language against a real Serve app (SmolLM2): examples, select vs transformers, forks on the prefix cache,
batching, streaming, errors, and the OpenAI-compatible backend on the same server."""

from __future__ import annotations

import pytest

import sgl_ray.lang as sgl
from sgl_ray.errors import InvalidRequestError, RemoteError, UnsupportedFeatureError

from ..conftest import API_KEY

pytestmark = [pytest.mark.serve, pytest.mark.ray]


def test_chat_example(load_example, example_argv):
    state = load_example("lang_chat").main(example_argv)
    roles = [m["role"] for m in state.messages()]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    for i in range(2):
        assert isinstance(state[f"answer_{i}"], str) and state[f"answer_{i}"].strip()
        assert state.get_meta_info(f"answer_{i}")["completion_tokens"] <= 12
    assert state.text().endswith(state["answer_1"] + "<|im_end|>\n")
    # The second turn's prompt extends the first one's: the prefix cache serves it.
    assert (
        state.get_meta_info("answer_1")["cached_tokens"]
        >= state.get_meta_info("answer_0")["prompt_tokens"] - 1
    )


def test_classify_example_labels_are_choices(load_example, example_argv):
    module = load_example("lang_classify")
    states = module.main(example_argv)
    assert len(states) == len(module.REVIEWS)
    for s in states:
        meta = s.get_meta_info("label")
        assert s["label"] in module.LABELS and s["label"] == max(meta["scores"], key=meta["scores"].get)
        assert s.text().endswith("Sentiment: " + s["label"])


def test_tree_of_thought_example(load_example, example_argv):
    state = load_example("lang_tree_of_thought").main(example_argv)
    thoughts = state["thought"]
    assert len(thoughts) == 3 and all(isinstance(t, str) for t in thoughts)
    assert state["best"] in {"1", "2", "3"}
    assert state.text().endswith("The best approach is number " + state["best"] + "<|im_end|>\n")


def test_batch_example(load_example, example_argv):
    states = load_example("lang_batch").main(example_argv + ["--num", "6", "--threads", "3"])
    assert len(states) == 6 and all(isinstance(s["line"], str) for s in states)
    assert sum(s.get_meta_info("line")["cached_tokens"] for s in states) > 0  # the shared system turn


CONTEXT = "Question: Which animal says moo?\nAnswer: the"
CHOICES = [" cow", " elephant", " hippopotamus", " cat"]


@pytest.mark.parametrize(
    "method",
    [sgl.token_length_normalized, sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized],
)
def test_select_matches_transformers(endpoint, scorer, method):
    @sgl.function
    def pick(s):
        s += CONTEXT + sgl.select("animal", CHOICES, choices_method=method)

    state = pick.run(backend=endpoint)
    meta = state.get_meta_info("animal")
    cond = [scorer.token_logprobs(CONTEXT, c) for c in CHOICES]
    for c, ref in zip(CHOICES, cond, strict=True):
        assert meta["token_logprobs"][c] == pytest.approx(ref, abs=2e-3)
    uncond = [scorer.token_logprobs("\n", c) for c in CHOICES] if method.needs_unconditional else None
    expected = method.decide(cond, uncond)
    assert state["animal"] == CHOICES[expected.index]
    assert [meta["scores"][c] for c in CHOICES] == pytest.approx(expected.scores, abs=2e-3)
    assert state.text() == CONTEXT + state["animal"]


def test_select_at_a_token_boundary(endpoint, scorer):
    """A choice that merges with the context's last token is scored on the tokens it changes."""
    context, choices = "The capital of France is Par", ["is", "ma", "k"]

    @sgl.function
    def pick(s):
        s += context + sgl.select("x", choices)

    state = pick.run(backend=endpoint)
    normalized = scorer.normalized(context, choices)
    assert state["x"] == choices[max(range(3), key=normalized.__getitem__)]
    assert [state.get_meta_info("x")["scores"][c] for c in choices] == pytest.approx(normalized, abs=2e-3)


def test_forked_branches_share_the_prefix(endpoint):
    branches = []

    @sgl.function
    def fan_out(s):
        s += sgl.system("You write short lists of animal names, one per line, nothing else.")
        s += sgl.user("List three farm animals.")
        s += sgl.assistant_begin()
        forks = s.fork(3)
        forks += [sgl.gen("item", max_tokens=4, temperature=0.9, seed=i) for i in range(3)]
        forks.join()
        branches.extend(forks)
        s += sgl.assistant_end()

    state = fan_out.run(backend=endpoint)
    assert len(state["item"]) == 3
    prefix_tokens = len(endpoint.tokenize([branches[0].text()[: -len(state["item"][0])]])[0])
    for b in branches:
        meta = b.get_meta_info("item")
        assert meta["prompt_tokens"] == prefix_tokens
        assert meta["cached_tokens"] >= prefix_tokens - 1  # all but the last prompt token come from the cache


@sgl.function
def answer(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("a", max_tokens=8))
    s += sgl.user("Say it shorter.")
    s += sgl.assistant(sgl.gen("b", max_tokens=6))


QUESTIONS = ["Name a fruit.", "What is 2+2?", "Name a color.", "Where is Paris?"]


def test_run_batch_matches_sequential_runs(endpoint):
    batch = answer.run_batch(
        [{"question": q} for q in QUESTIONS], num_threads=4, backend=endpoint, temperature=0
    )
    for q, b in zip(QUESTIONS, batch, strict=True):
        alone = answer.run(q, backend=endpoint, temperature=0)
        assert (b["a"], b["b"], b.text()) == (alone["a"], alone["b"], alone.text())


def test_streaming_yields_the_text(endpoint):
    state = answer.run("Name a fruit.", backend=endpoint, temperature=0, stream=True)
    pieces = list(state.text_iter())
    assert len(pieces) > 4 and "".join(pieces) == state.text()
    final = answer.run("Name a fruit.", backend=endpoint, temperature=0)
    assert final.text() == state.text()
    again = answer.run("Name a fruit.", backend=endpoint, temperature=0, stream=True)
    assert "".join(again.text_iter("a")) == final["a"]


def test_server_errors_surface_as_exceptions(serve_url, endpoint):
    with pytest.raises(InvalidRequestError, match="temperature"):
        answer.run("Hi", backend=endpoint, temperature=-1.0)
    streamed = answer.run("Hi", backend=endpoint, temperature=-1.0, stream=True)
    with pytest.raises(InvalidRequestError):
        list(streamed.text_iter())
    assert isinstance(streamed.error(), InvalidRequestError)
    with pytest.raises(InvalidRequestError, match="temperature"):
        answer.run_batch([{"question": "a"}, {"question": "b"}], backend=endpoint, temperature=-1.0)

    @sgl.function
    def too_long(s):
        s += "word " * 9000 + sgl.gen("x", max_tokens=2)

    with pytest.raises(InvalidRequestError):
        too_long.run(backend=endpoint)
    with pytest.raises(RemoteError) as info:
        answer.run("Hi", backend=sgl.RuntimeEndpoint(serve_url, api_key="wrong"))
    assert info.value.status_code == 401
    # The server keeps serving.
    assert answer.run("Hi", backend=endpoint, temperature=0)["a"]


def test_model_info_and_tokenize_routes(endpoint, smollm2_path):
    from sgl_ray.model_loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(smollm2_path))
    info = endpoint.get_model_info()
    assert info["served_model_name"] == "smollm2" and info["context_length"] > 0
    assert endpoint.role_format() == sgl.role_format_from_tokenizer(tok)
    texts = ["Hello world", "<|im_start|>user\nHi"]
    assert endpoint.tokenize(texts) == [tok.encode(t) for t in texts]
    for bad in ({"text": []}, {"text": 5}, {}):
        with pytest.raises(InvalidRequestError):
            endpoint.client.post("/tokenize", bad)


def test_openai_backend_on_the_same_server(serve_url, endpoint):
    chat = sgl.OpenAI("smollm2", base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0)
    via_chat = answer.run("Name a fruit.", backend=chat, temperature=0)
    via_native = answer.run("Name a fruit.", backend=endpoint, temperature=0)
    # The chat template renders the same prompt, so greedy answers agree.
    assert (via_chat["a"], via_chat["b"]) == (via_native["a"], via_native["b"])
    with pytest.raises(InvalidRequestError, match="temperature"):
        answer.run("Name a fruit.", backend=chat, temperature=-1.0)
    streamed = answer.run("Name a fruit.", backend=chat, temperature=0, stream=True)
    assert "".join(streamed.text_iter("a")) == via_native["a"]

    @sgl.function
    def pick(s):
        s += CONTEXT + sgl.select("animal", CHOICES)

    with pytest.raises(UnsupportedFeatureError):
        pick.run(backend=chat)
    completion = sgl.OpenAI(
        "smollm2", base_url=f"{serve_url}/v1", api_key=API_KEY, is_chat_model=False, max_retries=0
    )
    a, b = pick.run(backend=completion), pick.run(backend=endpoint)
    assert a["animal"] == b["animal"]
    sa, sb = a.get_meta_info("animal")["scores"], b.get_meta_info("animal")["scores"]
    assert [sa[c] for c in CHOICES] == pytest.approx([sb[c] for c in CHOICES], abs=2e-3)
    with pytest.raises(InvalidRequestError, match="assistant"):

        @sgl.function
        def no_turn(s):
            s += "Hi" + sgl.gen("x", max_tokens=2)

        no_turn.run(backend=chat)


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


@sgl.function
def call_tool(s, question):
    s += sgl.user(question)
    named = {"type": "function", "function": {"name": "get_weather"}}  # one call, then the turn ends
    s += sgl.assistant(sgl.gen("call", max_tokens=64, tools=TOOLS, tool_choice=named, seed=7))


def test_gen_with_tools_on_the_server(serve_url, endpoint):
    """Both server backends reach /v1/chat/completions with the tools: the same seeded calls, streamed or not."""
    import json

    import jsonschema

    chat = sgl.OpenAI("smollm2", base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0)
    native = call_tool.run("What is the weather in Paris?", backend=endpoint, temperature=0.7)
    calls = native.tool_calls("call")
    assert native["call"] == "" and native.get_meta_info("call")["finish_reason"] == "tool_calls"
    assert [c.name for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    via_chat = call_tool.run("What is the weather in Paris?", backend=chat, temperature=0.7)
    assert via_chat.tool_calls("call") == calls
    streamed = call_tool.run("What is the weather in Paris?", backend=chat, temperature=0.7, stream=True)
    assert "".join(streamed.text_iter()) == streamed.text()
    assert streamed.tool_calls("call") == calls
