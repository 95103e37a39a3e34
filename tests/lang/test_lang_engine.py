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
