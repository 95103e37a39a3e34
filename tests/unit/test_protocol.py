"""The OpenAI/SGLang wire protocol: decoding, validation, response shapes, stream assembly, chat templates.

Request bodies are written as the official ``openai`` client sends them (``extra_body`` fields merged at the top
level, fields we do not know included). Response shapes are compared key-by-key with OpenAI's API reference.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from jinja2 import TemplateError
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from sgl_ray import protocol as P
from sgl_ray.errors import InvalidRequestError, ModelNotFoundError
from sgl_ray.model_loader import load_tokenizer, resolve_model
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.tokenizer.detokenizer import IncrementalDetokenizer

VOCAB = 49152
CTX = 2048
EOS = 2  # SmolLM2's <|im_end|>
USER = {"role": "user", "content": "Hello!"}


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: str):
    return load_tokenizer(resolve_model(smollm2_path))


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _chat(**fields: Any) -> P.ChatCompletionRequest:
    return P.decode_request("chat", _body(**{"model": "smollm2", "messages": [USER], **fields}))


# --- decoding valid requests --------------------------------------------------------------------------------------


def test_chat_request_as_the_openai_client_sends_it():
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        "model": "smollm2",
        "max_tokens": 100,
        "max_completion_tokens": 32,
        "temperature": 0.7,
        "top_p": 0.9,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n\n", "END"],
        "seed": 42,
        "logprobs": True,
        "top_logprobs": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {"50": -100, "7": 2.5},
        "user": "u-1",
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,  # unknown to us: ignored
        "store": False,
        "metadata": {"k": "v"},
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "min_tokens": 2,
        "stop_token_ids": [EOS],
        "ignore_eos": False,
        "skip_special_tokens": True,
        "no_stop_trim": True,
    }
    req = P.decode_request("chat", json.dumps(body).encode())
    assert [m.role for m in req.messages] == ["developer", "user", "assistant", "tool"]
    assert req.messages[1].text() == "Hi\nthere" and req.messages[2].content is None
    assert req.response_format == P.ResponseFormat(type="json_object") and req.tool_choice == "auto"
    assert req.include_usage and req.requested_max_tokens == 32
    p = P.to_sampling_params(req, VOCAB, CTX, prompt_len=20)
    assert p == SamplingParams(
        max_new_tokens=32,
        min_new_tokens=2,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        frequency_penalty=0.25,
        presence_penalty=0.5,
        repetition_penalty=1.1,
        stop=["\n\n", "END"],
        stop_token_ids=[EOS],
        no_stop_trim=True,
        n=2,
        seed=42,
        logit_bias={50: -100.0, 7: 2.5},
        json_schema='{"type": "object"}',  # response_format json_object
    )
    assert P.logprob_options(req) == P.LogprobOptions(True, 3, -1)


def test_chat_defaults_and_nulls():
    req = P.decode_request(
        "chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": null, "n": null}'
    )
    assert req.model is None and not req.include_usage
    p = P.to_sampling_params(req, VOCAB, CTX, prompt_len=48)
    assert p.max_new_tokens == CTX - 48 and p.temperature == 1.0 and p.n == 1 and p.stop is None
    assert P.logprob_options(req) == P.LogprobOptions(False, 0, -1)
    greedy = P.to_sampling_params(req, VOCAB, CTX, 48, defaults=SamplingParams(temperature=0.0, top_k=5))
    assert greedy.temperature == 0.0 and greedy.top_k == 5
    assert P.to_sampling_params(_chat(stop="###"), VOCAB, CTX, 5).stop == ["###"]


@pytest.mark.parametrize(
    "prompt, texts, ids",
    [
        ("Once upon", ["Once upon"], None),
        (["a", "b"], ["a", "b"], None),
        ([1, 2, 3], None, [[1, 2, 3]]),
        ([[1, 2], [3]], None, [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt, texts, ids):
    req = P.decode_request(
        "completion", _body(model="m", prompt=prompt, echo=True, logprobs=2, best_of=1, stream=False)
    )
    assert req.prompt_batch() == (texts, ids)
    p = P.to_sampling_params(req, VOCAB, CTX, prompt_len=3)
    assert p.max_new_tokens == 16  # OpenAI's default for completions
    assert P.logprob_options(req) == P.LogprobOptions(True, 2, 0)  # echo: the prompt's logprobs too


def test_completion_max_tokens_zero_scores_the_prompt():
    req = P.decode_request("completion", _body(prompt="x", max_tokens=0, echo=True, logprobs=0))
    assert P.to_sampling_params(req, VOCAB, CTX, prompt_len=1).max_new_tokens == 0


def test_generate_request():
    req = P.decode_request(
        "generate",
        _body(text="Hi", sampling_params={"max_new_tokens": 4, "temperature": 0, "regex": "x"}, rid="r1"),
    )
    kwargs = req.engine_kwargs()
    assert kwargs["prompt"] == "Hi" and kwargs["input_ids"] is None and req.rid == "r1"
    assert kwargs["sampling_params"] == SamplingParams(max_new_tokens=4, temperature=0.0, regex="x")
    batch = P.decode_request(
        "generate",
        _body(
            input_ids=[[1, 2], [3]], sampling_params=[{"n": 2}, {}], return_logprob=True, top_logprobs_num=3
        ),
    )
    assert batch.input_ids == [[1, 2], [3]] and batch.sampling_params[0].n == 2
    assert batch.engine_kwargs()["top_logprobs_num"] == 3


# --- bad requests -------------------------------------------------------------------------------------------------

M = [USER]
BAD = [
    # (kind, body, param, code, prompt_len)
    ("chat", b'{"messages": [', None, None, 5),
    ("chat", b'{"model": "\xff\xfe", "messages": []}', None, None, 5),
    ("chat", b"[1, 2]", None, None, 5),
    ("chat", b"", None, None, 5),
    ("chat", _body(model="m"), "messages", None, 5),
    ("chat", _body(messages="hi"), "messages", None, 5),
    ("chat", _body(messages=[]), "messages", None, 5),
    ("chat", _body(messages=[{"content": "x"}]), "messages", None, 5),
    ("chat", _body(messages=[{"role": "robot", "content": "x"}]), "messages", None, 5),
    ("chat", _body(messages=[{"role": "user", "content": 5}]), "messages", None, 5),
    ("chat", _body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), "messages", None, 5),
    ("chat", _body(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages", None, 5),
    ("chat", _body(messages=M, model=3), "model", None, 5),
    ("chat", _body(messages=M, max_tokens="10"), "max_tokens", None, 5),
    ("chat", _body(messages=M, max_tokens=2.5), "max_tokens", None, 5),
    ("chat", _body(messages=M, max_tokens=-1), "max_tokens", "integer_below_min_value", 5),
    ("chat", _body(messages=M, max_tokens=0), "max_tokens", "integer_below_min_value", 5),
    ("chat", _body(messages=M, max_tokens=CTX), "max_tokens", "context_length_exceeded", 5),
    (
        "chat",
        _body(messages=M, max_completion_tokens=CTX),
        "max_completion_tokens",
        "context_length_exceeded",
        5,
    ),
    ("chat", _body(messages=M), "messages", "context_length_exceeded", CTX),
    ("chat", _body(messages=M, max_tokens=1), "messages", "context_length_exceeded", CTX + 7),
    ("chat", _body(messages=M, n=0), "n", "integer_below_min_value", 5),
    ("chat", _body(messages=M, n=129), "n", "integer_above_max_value", 5),
    ("chat", _body(messages=M, n="2"), "n", None, 5),
    ("chat", _body(messages=M, stream="yes"), "stream", None, 5),
    ("chat", _body(messages=M, stream_options={"include_usage": True}), "stream_options", None, 5),
    ("chat", _body(messages=M, logprobs=3), "logprobs", None, 5),
    ("chat", _body(messages=M, top_logprobs=2), "top_logprobs", None, 5),
    ("chat", _body(messages=M, logprobs=False, top_logprobs=2), "top_logprobs", None, 5),
    ("chat", _body(messages=M, logprobs=True, top_logprobs=21), "top_logprobs", "integer_above_max_value", 5),
    ("chat", _body(messages=M, logprobs=True, top_logprobs=-1), "top_logprobs", "integer_below_min_value", 5),
    ("chat", _body(messages=M, stop=""), "stop", None, 5),
    ("chat", _body(messages=M, stop=["a", ""]), "stop", None, 5),
    ("chat", _body(messages=M, stop=[str(i) for i in range(17)]), "stop", None, 5),
    ("chat", _body(messages=M, stop=[1]), "stop", None, 5),
    ("chat", _body(messages=M, temperature=2.5), "temperature", "decimal_above_max_value", 5),
    ("chat", _body(messages=M, temperature=-0.1), "temperature", "decimal_below_min_value", 5),
    ("chat", _body(messages=M, temperature="hot"), "temperature", None, 5),
    ("chat", _body(messages=M, top_p=0), "top_p", "decimal_below_min_value", 5),
    ("chat", _body(messages=M, top_p=1.5), "top_p", "decimal_above_max_value", 5),
    ("chat", _body(messages=M, presence_penalty=3), "presence_penalty", "decimal_above_max_value", 5),
    ("chat", _body(messages=M, frequency_penalty=-3), "frequency_penalty", "decimal_below_min_value", 5),
    ("chat", _body(messages=M, seed=-1), "seed", "integer_below_min_value", 5),
    ("chat", _body(messages=M, seed=2**64), "seed", "integer_above_max_value", 5),
    ("chat", _body(messages=M, logit_bias={"abc": 1}), "logit_bias", None, 5),
    ("chat", _body(messages=M, logit_bias={str(VOCAB): 1}), "logit_bias", None, 5),
    ("chat", _body(messages=M, logit_bias={"-1": 1}), "logit_bias", None, 5),
    ("chat", _body(messages=M, logit_bias={"5": 101}), "logit_bias", None, 5),
    ("chat", _body(messages=M, logit_bias={"5": "x"}), "logit_bias", None, 5),
    ("chat", _body(messages=M, logit_bias=[1]), "logit_bias", None, 5),
    ("chat", _body(messages=M, max_tokens=4, min_tokens=5), "min_tokens", "integer_above_max_value", 5),
    ("chat", _body(messages=M, top_k=-5), "top_k", None, 5),
    ("chat", _body(messages=M, repetition_penalty=0), "repetition_penalty", None, 5),
    ("chat", _body(messages=M, stop_token_ids=[VOCAB]), "stop_token_ids", None, 5),
    ("completion", _body(model="m"), "prompt", None, 5),
    ("completion", _body(prompt=5), "prompt", None, 5),
    ("completion", _body(prompt=[]), "prompt", None, 5),
    ("completion", _body(prompt=[1, "a"]), "prompt", None, 5),
    ("completion", _body(prompt=[[1], []]), "prompt", None, 5),
    ("completion", _body(prompt="x", suffix="y"), "suffix", None, 5),
    ("completion", _body(prompt="x", logprobs=6), "logprobs", "integer_above_max_value", 5),
    ("completion", _body(prompt="x", logprobs=-1), "logprobs", "integer_below_min_value", 5),
    ("completion", _body(prompt="x", logprobs=True), "logprobs", None, 5),
    ("completion", _body(prompt="x", max_tokens=-1), "max_tokens", "integer_below_min_value", 5),
    ("completion", _body(prompt="x", max_tokens=CTX - 4), "max_tokens", "context_length_exceeded", 5),
    ("completion", _body(prompt="x"), "prompt", "context_length_exceeded", CTX),
    ("completion", _body(prompt="x", echo="yes"), "echo", None, 5),
    ("generate", _body(sampling_params={}), "text", None, 5),
    ("generate", _body(text="a", input_ids=[1]), "text", None, 5),
    ("generate", _body(input_ids=[]), "input_ids", None, 5),
    ("generate", _body(input_ids=[[1], 2]), "input_ids", None, 5),
    ("generate", _body(text="a", sampling_params={"temperature": "x"}), "sampling_params", None, 5),
    ("generate", _body(text="a", top_logprobs_num=30), "top_logprobs_num", None, 5),
]


@pytest.mark.parametrize("kind, body, param, code, prompt_len", BAD)
def test_bad_requests_are_400s_naming_the_param(kind, body, param, code, prompt_len):
    with pytest.raises(InvalidRequestError) as info:
        req = P.decode_request(kind, body)
        if kind != "generate":
            P.to_sampling_params(req, VOCAB, CTX, prompt_len)
    err = info.value
    assert (err.status_code, err.param, err.code) == (400, param, code), err.message
    assert err.message and "Traceback" not in err.message
    error = json.loads(P.error_body(err))["error"]
    assert error == {"message": err.message, "type": "invalid_request_error", "param": param, "code": code}


def test_error_messages_read_like_openai():
    with pytest.raises(InvalidRequestError, match="image inputs are not supported yet"):
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(InvalidRequestError) as info:
        P.to_sampling_params(_chat(max_tokens=2000), VOCAB, CTX, prompt_len=62)
    assert info.value.message == (
        "This model's maximum context length is 2048 tokens. However, you requested 2062 tokens "
        "(62 in the messages, 2000 in the completion). Please reduce the length of the messages or completion."
    )
    with pytest.raises(InvalidRequestError, match=r"Invalid type for 'messages\[0\].content'"):
        P.decode_request("chat", _body(messages=[{"role": "user", "content": 1}]))
    with pytest.raises(InvalidRequestError, match="Missing required parameter: 'messages'"):
        P.decode_request("chat", b"{}")
    with pytest.raises(InvalidRequestError, match="not valid UTF-8"):
        P.decode_request("chat", b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}')
    with pytest.raises(ValueError, match="unknown request kind"):
        P.decode_request("embeddings", b"{}")  # type: ignore[call-overload]


def test_prompt_id_checks():
    P.check_prompt_ids([0, VOCAB - 1], VOCAB)
    with pytest.raises(InvalidRequestError) as info:
        P.check_prompt_ids([1, VOCAB], VOCAB)
    assert info.value.param == "prompt"


# --- response shapes ----------------------------------------------------------------------------------------------


def _shape(x: Any) -> Any:
    """Keys and value kinds of a JSON document (lists by their first element)."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(x[0])] if x else []
    return "number" if isinstance(x, (int, float)) and not isinstance(x, bool) else type(x).__name__


def _out(rid="r", ids=(), text="", finish=None, prompt=7, done=0, cached=0, lps=None, tops=None, **kw):
    return RequestOutput(
        rid=rid,
        token_ids=list(ids),
        text=text,
        finished=finish is not None,
        finish_reason=finish,
        prompt_tokens=prompt,
        completion_tokens=done,
        cached_tokens=cached,
        output_logprobs=lps,
        output_top_logprobs=tops,
        **kw,
    )


TOP = {"token": "x", "logprob": -0.1, "bytes": [120]}
CHAT_RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi"},
            "logprobs": {"content": [{**TOP, "top_logprobs": [TOP]}]},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 7,
        "completion_tokens": 2,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
    "system_fingerprint": "fp",
}


def test_chat_response_shape(tokenizer):
    ids = tokenizer.encode("Hi", add_special_tokens=False)
    assert len(ids) == 1
    texts = P.TokenTexts(tokenizer)
    header = dict(model="m", request_id="chatcmpl-1", created=1, system_fingerprint="fp")
    builder = P.ChatResponseBuilder(logprobs=True, token_texts=texts, **header)
    lps, tops = [(-0.5, ids[0]), (-0.01, EOS)], [[(-0.5, ids[0])], [(-0.01, EOS)]]
    stop = {"type": "stop", "matched": EOS}
    builder.add(0, _out(ids=[ids[0], EOS], text="Hi", finish=stop, done=2, lps=lps, tops=tops))
    doc = json.loads(P.encode(builder.build()))
    assert _shape(doc) == _shape(CHAT_RESPONSE)
    entries = doc["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["Hi"]  # the EOS that ended it is not rendered, nor listed
    plain = P.ChatResponseBuilder(model="m", n=2)
    plain.add(1, _out(text="x", finish={"type": "abort", "message": "gone"}))
    doc = json.loads(P.encode(plain.build()))
    assert doc["choices"][0]["logprobs"] is None and doc["choices"][1]["finish_reason"] == "abort"
    assert "system_fingerprint" not in doc and doc["choices"][0]["message"]["content"] == ""


def test_completion_and_misc_shapes():
    builder = P.CompletionResponseBuilder(model="m", request_id="cmpl-1", created=1)
    builder.add(0, _out(ids=[5], text=" there", finish={"type": "length", "length": 1}, done=1))
    assert json.loads(P.encode(builder.build())) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"text": " there", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": 1,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    models_doc = json.loads(P.encode(P.ModelList(data=[P.ModelCard(id="smollm2", created=5)])))
    assert models_doc == {
        "object": "list",
        "data": [{"id": "smollm2", "object": "model", "created": 5, "owned_by": "sgl_ray"}],
    }
    engine_result = {
        "text": "a",
        "output_ids": [1],
        "meta_info": {"id": "r", "finish_reason": {"type": "stop"}},
    }
    assert json.loads(P.encode(P.GenerateResponse.from_engine(engine_result))) == engine_result
    assert P.sse_event(P.ModelCard(id="x", created=0)) == (
        b'data: {"id":"x","object":"model","created":0,"owned_by":"sgl_ray"}\n\n'
    )
    assert P.SSE_DONE == b"data: [DONE]\n\n"
    err = ModelNotFoundError("The model 'x' does not exist", param="model", code="model_not_found")
    assert json.loads(P.error_body(err))["error"]["type"] == "not_found_error" and err.status_code == 404
    assert P.sse_error(err) == b"data: " + P.error_body(err) + b"\n\n"
    assert json.loads(P.internal_error_body()) == {
        "error": {"message": "Internal server error", "type": "internal_error", "param": None, "code": None}
    }
    assert P.new_request_id("chatcmpl").startswith("chatcmpl-") and P.now() > 1_600_000_000


# --- streaming ----------------------------------------------------------------------------------------------------


def _engine_deltas(tokenizer, rid: str, text: str, finish: dict, prompt: int, cached: int, top: int):
    """The RequestOutputs an engine emits for ``text`` one token per step (text held back mid-character)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if finish["type"] == "stop":
        ids.append(EOS)
    detok = IncrementalDetokenizer(tokenizer)
    outs = []
    for i, tid in enumerate(ids):
        last = i == len(ids) - 1
        piece = "" if last and finish["type"] == "stop" else detok.step([tid])
        if last:
            piece += detok.flush()
        alts = [(-0.1 - k, (tid + k) % VOCAB) for k in range(top)]
        outs.append(
            _out(rid, [tid], piece, finish if last else None, prompt, i + 1, cached, [(-0.1, tid)], [alts])
        )
    return outs


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out += [x for x in (a[i : i + 1] + b[i : i + 1])]
    return out


TEXTS = ["Hello there! How can I help? 😀", "Hi 👋🏽 — déjà vu"]


def test_chat_stream_n2_interleaved(tokenizer):
    req = _chat(n=2, stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    texts = P.TokenTexts(tokenizer)
    finishes = [{"type": "stop", "matched": EOS}, {"type": "length", "length": 12}]
    a = _engine_deltas(tokenizer, "r-0", TEXTS[0], finishes[0], prompt=30, cached=0, top=2)
    b = _engine_deltas(tokenizer, "r-1", TEXTS[1], finishes[1], prompt=30, cached=29, top=2)
    asm = P.ChatStreamAssembler.from_request(req, model="m", token_texts=texts)
    builder = P.ChatResponseBuilder.from_request(req, model="m", token_texts=texts)
    chunks = []
    for out in _interleave(a, b):
        index = int(out.rid[-1])
        chunks += asm.add(index, out)
        builder.add(index, out)
    assert asm.done
    chunks += asm.finish()
    docs = [json.loads(P.sse_event(c)[len(b"data: ") : -2]) for c in chunks]
    assert all(d["object"] == "chat.completion.chunk" and d["id"] == asm.id and "usage" in d for d in docs)
    assert docs[-1]["choices"] == [] and all(d["usage"] is None for d in docs[:-1])
    full = builder.build()
    for i in (0, 1):
        mine = [d["choices"][0] for d in docs[:-1] if d["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in mine].count(None) == len(mine) - 1
        assert mine[-1] == {"index": i, "delta": {}, "logprobs": None, "finish_reason": finishes[i]["type"]}
        content = "".join(c["delta"].get("content", "") for c in mine)
        assert content == TEXTS[i] == full.choices[i].message.content
        entries = [e for c in mine[1:-1] for e in c["logprobs"]["content"]]
        assert len(entries) == len(tokenizer.encode(TEXTS[i], add_special_tokens=False))
        assert (
            bytes(b for e in entries for b in e["bytes"]) == TEXTS[i].encode()
        )  # byte-exact, emoji included
        assert all(len(e["top_logprobs"]) == 2 for e in entries)
        assert entries == msgspec.to_builtins(full.choices[i].logprobs.content)
    completion = len(a) + len(b)
    assert docs[-1]["usage"] == {
        "prompt_tokens": 30,  # the prompt is counted once for both samples
        "completion_tokens": completion,
        "total_tokens": 30 + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert msgspec.to_builtins(full.usage) == docs[-1]["usage"]


def test_chat_stream_without_usage_and_start():
    asm = P.ChatStreamAssembler.from_request(_chat(stream=True, n=2), model="m")
    first = asm.start()
    assert [c.choices[0].index for c in first] == [0, 1] and asm.start() == []
    chunks = asm.add(1, _out(text="ok", finish={"type": "length", "length": 1}, done=1))
    docs = [json.loads(P.encode(c)) for c in chunks]
    assert [d["choices"][0]["delta"] for d in docs] == [{"content": "ok"}, {}]
    assert all("usage" not in d for d in docs) and asm.finish() == [] and not asm.done
    with pytest.raises(ValueError, match="already finished"):
        asm.add(1, _out(text="more"))
    with pytest.raises(ValueError, match="outside"):
        asm.add(2, _out(text="x"))


def test_completion_stream_echo_logprobs(tokenizer):
    prompt_ids = tokenizer.encode("The sky is", add_special_tokens=False)
    req = P.decode_request(
        "completion",
        _body(
            prompt=["The sky is"],
            n=2,
            echo=True,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        ),
    )
    inputs = [(None, prompt_ids[0])] + [(-1.5, t) for t in prompt_ids[1:]]
    in_tops = [[]] + [[(-1.0, t)] for t in prompt_ids[1:]]
    texts = P.TokenTexts(tokenizer)
    asm = P.CompletionStreamAssembler.from_request(req, model="m", token_texts=texts)
    builder = P.CompletionResponseBuilder.from_request(req, model="m", token_texts=texts)
    outs = {
        i: _engine_deltas(tokenizer, f"r-{i}", " blue.", {"type": "length", "length": 2}, 3, 0, 1)
        for i in (0, 1)
    }
    for i in (0, 1):  # the prefill step returns the prompt logprobs with the first token
        outs[i][0].input_logprobs, outs[i][0].input_top_logprobs = inputs, in_tops
    chunks = []
    for i, out in [(0, outs[0][0]), (1, outs[1][0]), (1, outs[1][1]), (0, outs[0][1])]:
        chunks += asm.add(i, out)
        builder.add(i, out)
    chunks += asm.finish()
    docs = [json.loads(P.encode(c)) for c in chunks]
    assert all(d["object"] == "text_completion" for d in docs) and docs[-1]["usage"]["prompt_tokens"] == 3
    full = json.loads(P.encode(builder.build()))
    for i in (0, 1):
        mine = [d["choices"][0] for d in docs[:-1] if d["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == "The sky is blue." == full["choices"][i]["text"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
        lp = full["choices"][i]["logprobs"]
        assert lp["tokens"][: len(prompt_ids)] == [texts(t)[0] for t in prompt_ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        pairs = zip(lp["tokens"][1:], lp["top_logprobs"][1:], strict=True)
        assert all(len(top) <= 2 and tok in top for tok, top in pairs)
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        streamed = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert streamed == lp["tokens"]


def test_completion_multiple_prompts_usage():
    builder = P.CompletionResponseBuilder(model="m", n=2, num_prompts=2)
    for i, prompt in enumerate([4, 4, 9, 9]):
        builder.add(
            i, _out(text=str(i), finish={"type": "length"}, prompt=prompt, done=1, cached=4 - i % 2 * 4)
        )
    usage = builder.build().usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (
        13,
        4,
        0,
    )


# --- logprobs and token texts -------------------------------------------------------------------------------------


def test_token_texts_byte_level(tokenizer):
    texts = P.TokenTexts(tokenizer)
    ids = tokenizer.encode("héllo 😀", add_special_tokens=False)
    assert bytes(b for t in ids for b in texts(t)[1]) == "héllo 😀".encode()
    assert [texts(t)[0] for t in ids] == [tokenizer.decode([t]) for t in ids]
    assert texts(EOS) == ("<|im_end|>", list(b"<|im_end|>"))
    entry = P.chat_logprob_entries(texts, [(float("-inf"), ids[0])], [[(float("-inf"), ids[1])]])[0]
    assert entry.logprob == -9999.0 and entry.top_logprobs[0].logprob == -9999.0


def test_token_texts_sentencepiece():
    vocab = {"<unk>": 0, "▁Hello": 1, "<0xF0>": 2, "<0x9F>": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    texts = P.TokenTexts(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"))
    assert texts(1) == (" Hello", list(b" Hello")) and texts(4) == ("world", list(b"world"))
    assert texts(2) == ("\ufffd", [0xF0])


# --- chat templates -----------------------------------------------------------------------------------------------


def test_render_chat_matches_apply_chat_template(tokenizer):
    conversations = [
        [USER],
        [{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "Hi."}, USER],
    ]
    for conv in conversations:
        req = _chat(messages=conv)
        expected = tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert P.render_chat(tokenizer, req.messages) == list(expected)
        assert P.render_chat(tokenizer, conv) == list(expected)
    parts = _chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, USER])
    assert P.render_chat(tokenizer, parts.messages, add_generation_prompt=False) == P.render_chat(
        tokenizer, conversations[1][:2], add_generation_prompt=False
    )


def test_render_chat_errors():
    class NoTemplate:
        chat_template = None

    class Raising:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, *args, **kwargs):
            raise TemplateError("roles must alternate")

    for tok, match in [(NoTemplate(), "no chat template"), (Raising(), "roles must alternate")]:
        with pytest.raises(InvalidRequestError, match=match) as info:
            P.render_chat(tok, [USER])
        assert info.value.param == "messages"
