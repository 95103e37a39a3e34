"""The language on an in-process ``sgl_ray.Engine`` (no Ray, no server), checked against transformers."""

from __future__ import annotations

import pytest

import sgl_ray
import sgl_ray.lang as sgl
from sgl_ray.errors import InvalidRequestError


@pytest.fixture(scope="module")
def engine_backend(smollm2_path):
    with sgl_ray.Engine(smollm2_path, max_total_tokens=4096) as engine:
        yield sgl.EngineBackend(engine)


@sgl.function
def qa(s, question):
    s += sgl.user(question)
    with s.assistant():
        s += "Answer:" + sgl.gen("answer", max_tokens=8, ignore_eos=True)
    s += sgl.user("Is that correct?")
    s += sgl.assistant(sgl.select("verdict", ["Yes, it is.", "No."]))


def test_program_on_the_engine_matches_transformers(engine_backend, hf_reference, scorer):
    state = qa.run("What is the capital of France?", backend=engine_backend, temperature=0)
    tok = engine_backend.engine.tokenizer
    text = state.text()
    fmt = engine_backend.role_format()
    prompt = text[: text.index("Answer:") + len("Answer:")]
    assert prompt.startswith(fmt.default_system + fmt.prefix["user"])  # the template's default system turn
    expected = hf_reference("smollm2")(tok.encode(prompt), 8)
    assert state["answer"] == tok.decode(expected, skip_special_tokens=True)
    context = text[: text.rindex(state["verdict"])]
    normalized = scorer.normalized(context, ["Yes, it is.", "No."])
    assert state["verdict"] == ["Yes, it is.", "No."][normalized.index(max(normalized))]
    assert [m["role"] for m in state.messages()] == ["user", "assistant", "user", "assistant"]
    assert text == tok.apply_chat_template(state.messages(), tokenize=False)  # rendered as the template does


def test_fork_stream_and_batch_on_the_engine(engine_backend):
    @sgl.function
    def branches(s, topic):
        s += sgl.user(f"Write about {topic}.")
        s += sgl.assistant_begin()
        forks = s.fork(2)
        forks += sgl.gen("part", max_tokens=4)
        forks.join()
        s += sgl.assistant_end()

    state = branches.run("cats", backend=engine_backend, temperature=0)
    assert len(state["part"]) == 2 and state["part"][0] == state["part"][1]  # greedy branches agree
    streamed = qa.run("Name a color.", backend=engine_backend, temperature=0, stream=True)
    assert "".join(streamed.text_iter()) == streamed.text()
    batch = qa.run_batch([{"question": "Name a color."}], backend=engine_backend, temperature=0)
    assert batch[0].text() == streamed.text()
    with pytest.raises(InvalidRequestError, match="top_p"):
        qa.run("Hi", backend=engine_backend, top_p=0.0)


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_gen_with_tools_on_the_engine(engine_backend):
    """A named function is forced and parsed in process (the chat path's template, grammar and parser); the call
    stays out of the text, and the next turn is a plain gen."""
    import json

    import jsonschema

    @sgl.function
    def agent(s):
        s += sgl.user("What is the weather in Paris?")
        s += sgl.assistant(sgl.gen("call", max_tokens=64, tools=TOOLS, tool_choice=NAMED, seed=7))
        s += sgl.user("It is 18 degrees. Say thanks.")
        s += sgl.assistant(sgl.gen("reply", max_tokens=4))

    state = agent.run(backend=engine_backend, temperature=0.7)
    [call] = state.tool_calls("call")
    assert call.name == "get_weather" and state["call"] == ""
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert state.get_meta_info("call")["tool_calls"] == [call._asdict()]
    assert state.tool_calls("reply") == [] and isinstance(state["reply"], str)
    assert [m["content"] for m in state.messages()][1] == ""
    with pytest.raises(InvalidRequestError, match="assistant turn"):

        @sgl.function
        def no_turn(s):
            s += sgl.user("Hi") + sgl.gen("x", max_tokens=2, tools=TOOLS)

        no_turn.run(backend=engine_backend)
