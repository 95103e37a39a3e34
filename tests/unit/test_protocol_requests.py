"""The OpenAI/SGLang wire protocol, requests: decoding what the official ``openai`` client sends (``extra_body``
fields merged at the top level, fields we do not know included) and rejecting bad requests with OpenAI-style
errors that name the parameter."""

from __future__ import annotations

import json

import pytest

from sgl_ray import protocol as P
from sgl_ray.errors import InvalidRequestError
from sgl_ray.sampling.params import SamplingParams

from .protocol_helpers import CTX, EOS, USER, VOCAB, body_of, chat_request

# --- decoding valid requests --------------------------------------------------------------------------------------


def test_chat_request_as_the_openai_client_sends_it():
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
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
        "parallel_tool_calls": False,
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
    assert P.to_sampling_params(chat_request(stop="###"), VOCAB, CTX, 5).stop == ["###"]


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
        "completion", body_of(model="m", prompt=prompt, echo=True, logprobs=2, best_of=1, stream=False)
    )
    assert req.prompt_batch() == (texts, ids)
    p = P.to_sampling_params(req, VOCAB, CTX, prompt_len=3)
    assert p.max_new_tokens == 16  # OpenAI's default for completions
    assert P.logprob_options(req) == P.LogprobOptions(True, 2, 0)  # echo: the prompt's logprobs too


def test_completion_max_tokens_zero_scores_the_prompt():
    req = P.decode_request("completion", body_of(prompt="x", max_tokens=0, echo=True, logprobs=0))
    assert P.to_sampling_params(req, VOCAB, CTX, prompt_len=1).max_new_tokens == 0


def test_generate_request():
    req = P.decode_request(
        "generate",
        body_of(text="Hi", sampling_params={"max_new_tokens": 4, "temperature": 0, "regex": "x"}, rid="r1"),
    )
    kwargs = req.engine_kwargs()
    assert kwargs["prompt"] == "Hi" and kwargs["input_ids"] is None and req.rid == "r1"
    assert kwargs["sampling_params"] == SamplingParams(max_new_tokens=4, temperature=0.0, regex="x")
    batch = P.decode_request(
        "generate",
        body_of(
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
    ("chat", body_of(model="m"), "messages", None, 5),
    ("chat", body_of(messages="hi"), "messages", None, 5),
    ("chat", body_of(messages=[]), "messages", None, 5),
    ("chat", body_of(messages=[{"content": "x"}]), "messages", None, 5),
    ("chat", body_of(messages=[{"role": "robot", "content": "x"}]), "messages", None, 5),
    ("chat", body_of(messages=[{"role": "user", "content": 5}]), "messages", None, 5),
    ("chat", body_of(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), "messages", None, 5),
    ("chat", body_of(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages", None, 5),
    ("chat", body_of(messages=M, model=3), "model", None, 5),
    ("chat", body_of(messages=M, max_tokens="10"), "max_tokens", None, 5),
    ("chat", body_of(messages=M, max_tokens=2.5), "max_tokens", None, 5),
    ("chat", body_of(messages=M, max_tokens=-1), "max_tokens", "integer_below_min_value", 5),
    ("chat", body_of(messages=M, max_tokens=0), "max_tokens", "integer_below_min_value", 5),
    ("chat", body_of(messages=M, max_tokens=CTX), "max_tokens", "context_length_exceeded", 5),
    (
        "chat",
        body_of(messages=M, max_completion_tokens=CTX),
        "max_completion_tokens",
        "context_length_exceeded",
        5,
    ),
    ("chat", body_of(messages=M), "messages", "context_length_exceeded", CTX),
    ("chat", body_of(messages=M, max_tokens=1), "messages", "context_length_exceeded", CTX + 7),
    ("chat", body_of(messages=M, n=0), "n", "integer_below_min_value", 5),
    ("chat", body_of(messages=M, n=129), "n", "integer_above_max_value", 5),
    ("chat", body_of(messages=M, n="2"), "n", None, 5),
    ("chat", body_of(messages=M, stream="yes"), "stream", None, 5),
    ("chat", body_of(messages=M, stream_options={"include_usage": True}), "stream_options", None, 5),
    ("chat", body_of(messages=M, logprobs=3), "logprobs", None, 5),
    ("chat", body_of(messages=M, top_logprobs=2), "top_logprobs", None, 5),
    ("chat", body_of(messages=M, logprobs=False, top_logprobs=2), "top_logprobs", None, 5),
    (
        "chat",
        body_of(messages=M, logprobs=True, top_logprobs=21),
        "top_logprobs",
        "integer_above_max_value",
        5,
    ),
    (
        "chat",
        body_of(messages=M, logprobs=True, top_logprobs=-1),
        "top_logprobs",
        "integer_below_min_value",
        5,
    ),
    ("chat", body_of(messages=M, stop=""), "stop", None, 5),
    ("chat", body_of(messages=M, stop=["a", ""]), "stop", None, 5),
    ("chat", body_of(messages=M, stop=[str(i) for i in range(17)]), "stop", None, 5),
    ("chat", body_of(messages=M, stop="x" * 1025), "stop", "string_above_max_length", 5),
    ("chat", body_of(messages=M, stop=["a", "x" * 2**20]), "stop", "string_above_max_length", 5),
    ("chat", body_of(messages=M, stop=[1]), "stop", None, 5),
    ("chat", body_of(messages=M, temperature=2.5), "temperature", "decimal_above_max_value", 5),
    ("chat", body_of(messages=M, temperature=-0.1), "temperature", "decimal_below_min_value", 5),
    ("chat", body_of(messages=M, temperature="hot"), "temperature", None, 5),
    ("chat", body_of(messages=M, top_p=0), "top_p", "decimal_below_min_value", 5),
    ("chat", body_of(messages=M, top_p=1.5), "top_p", "decimal_above_max_value", 5),
    ("chat", body_of(messages=M, presence_penalty=3), "presence_penalty", "decimal_above_max_value", 5),
    ("chat", body_of(messages=M, frequency_penalty=-3), "frequency_penalty", "decimal_below_min_value", 5),
    ("chat", body_of(messages=M, seed=-1), "seed", "integer_below_min_value", 5),
    ("chat", body_of(messages=M, seed=2**64), "seed", "integer_above_max_value", 5),
    ("chat", body_of(messages=M, logit_bias={"abc": 1}), "logit_bias", None, 5),
    ("chat", body_of(messages=M, logit_bias={str(VOCAB): 1}), "logit_bias", None, 5),
    ("chat", body_of(messages=M, logit_bias={"-1": 1}), "logit_bias", None, 5),
    ("chat", body_of(messages=M, logit_bias={"5": 101}), "logit_bias", None, 5),
    ("chat", body_of(messages=M, logit_bias={"5": "x"}), "logit_bias", None, 5),
    ("chat", body_of(messages=M, logit_bias=[1]), "logit_bias", None, 5),
    ("chat", body_of(messages=M, max_tokens=4, min_tokens=5), "min_tokens", "integer_above_max_value", 5),
    ("chat", body_of(messages=M, top_k=-5), "top_k", None, 5),
    ("chat", body_of(messages=M, top_k=2**63), "top_k", "integer_above_max_value", 5),
    ("chat", body_of(messages=M, priority=2**70), "priority", "integer_above_max_value", 5),
    ("chat", body_of(messages=M, priority=-(2**63) - 1), "priority", "integer_below_min_value", 5),
    ("chat", body_of(messages=M, repetition_penalty=0), "repetition_penalty", None, 5),
    ("chat", body_of(messages=M, stop_token_ids=[VOCAB]), "stop_token_ids", None, 5),
    ("completion", body_of(model="m"), "prompt", None, 5),
    ("completion", body_of(prompt=5), "prompt", None, 5),
    ("completion", body_of(prompt=[]), "prompt", None, 5),
    ("completion", body_of(prompt=[1, "a"]), "prompt", None, 5),
    ("completion", body_of(prompt=[[1], []]), "prompt", None, 5),
    ("completion", body_of(prompt="x", suffix="y"), "suffix", None, 5),
    ("completion", body_of(prompt="x", logprobs=6), "logprobs", "integer_above_max_value", 5),
    ("completion", body_of(prompt="x", logprobs=-1), "logprobs", "integer_below_min_value", 5),
    ("completion", body_of(prompt="x", logprobs=True), "logprobs", None, 5),
    ("completion", body_of(prompt="x", max_tokens=-1), "max_tokens", "integer_below_min_value", 5),
    ("completion", body_of(prompt="x", max_tokens=CTX - 4), "max_tokens", "context_length_exceeded", 5),
    ("completion", body_of(prompt="x"), "prompt", "context_length_exceeded", CTX),
    ("completion", body_of(prompt="x", echo="yes"), "echo", None, 5),
    ("completion", body_of(prompt="x", prompt_logprobs=21), "prompt_logprobs", "integer_above_max_value", 5),
    ("completion", body_of(prompt="x", top_k=2**70), "top_k", "integer_above_max_value", 5),
    ("responses", body_of(input="hi", top_k=2**70), "top_k", "integer_above_max_value", 5),
    ("responses", body_of(input="hi", stop=["x" * 1025]), "stop", "string_above_max_length", 5),
    ("responses", body_of(input=[{"type": "reasoning", "summary": []}]), "input", None, 5),
    ("generate", body_of(sampling_params={}), "text", None, 5),
    ("generate", body_of(text="a", input_ids=[1]), "text", None, 5),
    ("generate", body_of(input_ids=[]), "input_ids", None, 5),
    ("generate", body_of(input_ids=[[1], 2]), "input_ids", None, 5),
    # /generate: a 400 about a sampling parameter names that field, for a wrong type as for a wrong value
    ("generate", body_of(text="a", sampling_params={"temperature": "x"}), "temperature", None, 5),
    ("generate", body_of(text="a", top_logprobs_num=30), "top_logprobs_num", "integer_above_max_value", 5),
    ("generate", body_of(text="a", sampling_params={"logit_bias": {"x": 1}}), "logit_bias", None, 5),
    ("generate", body_of(text="a", sampling_params={"max_tokenz": 1}), "sampling_params", None, 5),
    ("generate", body_of(text="a", logprob_start_len=-2), "logprob_start_len", "integer_below_min_value", 5),
    (
        "generate",
        body_of(text="a", logprob_start_len=2**70),
        "logprob_start_len",
        "integer_above_max_value",
        5,
    ),
    ("generate", body_of(text="a", priority=2**70), "priority", "integer_above_max_value", 5),
    ("generate", body_of(text="a", sampling_params={"top_k": 2**70}), "top_k", "integer_above_max_value", 5),
    (
        "generate",
        body_of(text=["a", "b"], sampling_params=[{}, {"max_new_tokens": 2**63}]),
        "max_new_tokens",
        "integer_above_max_value",
        5,
    ),
    (
        "generate",
        body_of(text="a", sampling_params={"stop": "x" * 1025}),
        "stop",
        "string_above_max_length",
        5,
    ),
    ("generate", body_of(text="a", sampling_params={"stop": ["a", ""]}), "stop", None, 5),
    ("completion", body_of(prompt="x"), "prompt", None, 0),  # a text that encodes to no tokens
    (
        "chat",
        body_of(messages=M, tools=[{"type": "function", "function": {"name": "f", "strict": "y"}}]),
        "tools",
        None,
        5,
    ),
]


@pytest.mark.parametrize("kind, body, param, code, prompt_len", BAD)
def test_bad_requests_are_400s_naming_the_param(kind, body, param, code, prompt_len):
    with pytest.raises(InvalidRequestError) as info:
        req = P.decode_request(kind, body)
        if kind == "responses":  # served on the chat path, its 400s in the Responses API's names
            with P.responses_errors():
                P.to_sampling_params(req.to_chat(), VOCAB, CTX, prompt_len)
        elif kind != "generate":
            P.to_sampling_params(req, VOCAB, CTX, prompt_len)
        else:  # /generate: every check without the model is the request's own
            pytest.fail(f"decoded without an error: {req}")
    err = info.value
    assert (err.status_code, err.param, err.code) == (400, param, code), err.message
    assert err.message and "Traceback" not in err.message
    error = json.loads(P.error_body(err))["error"]
    assert error == {"message": err.message, "type": "invalid_request_error", "param": param, "code": code}


def test_error_messages_read_like_openai():
    with pytest.raises(
        InvalidRequestError, match="content part type 'image' is not supported; use 'image_url'"
    ):
        chat_request(messages=[{"role": "user", "content": [{"type": "image", "image": "x"}]}])
    with pytest.raises(InvalidRequestError) as info:
        P.to_sampling_params(chat_request(max_tokens=2000), VOCAB, CTX, prompt_len=62)
    assert info.value.message == (
        "This model's maximum context length is 2048 tokens. However, you requested 2062 tokens "
        "(62 in the messages, 2000 in the completion). Please reduce the length of the messages or completion."
    )
    with pytest.raises(InvalidRequestError, match=r"Invalid type for 'messages\[0\].content'"):
        P.decode_request("chat", body_of(messages=[{"role": "user", "content": 1}]))
    with pytest.raises(InvalidRequestError, match="Missing required parameter: 'messages'"):
        P.decode_request("chat", b"{}")
    with pytest.raises(InvalidRequestError, match="not valid UTF-8"):
        P.decode_request("chat", b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}')
    with pytest.raises(ValueError, match="unknown request kind"):
        P.decode_request("embeddings", b"{}")  # type: ignore[call-overload]
    for body in (rb'{"messages": [], "user": "\ud800"}', rb'{"messages": [], "user": "x\udc00\ud800"}'):
        with pytest.raises(InvalidRequestError, match="unpaired UTF-16 surrogate escape"):
            P.decode_request("chat", body)
    assert P.decode_request("tokenize", rb'{"text": "\ud83d\ude00 \\ud800"}').text == "\U0001f600 \\ud800"
    with pytest.raises(InvalidRequestError, match=r"Invalid key in 'sampling_params.logit_bias'"):
        P.decode_request("generate", body_of(text="a", sampling_params={"logit_bias": {"x": 1}}))


def test_grammar_errors_name_the_field_the_grammar_came_from():
    engine_error = InvalidRequestError('json_schema: Unsupported type "bogus"', param="json_schema")
    renamed = P.grammar_error_for(engine_error, "response_format")
    assert (renamed.param, renamed.message) == (
        "response_format",
        "Invalid 'response_format.json_schema.schema': Unsupported type \"bogus\"",
    )
    assert P.grammar_error_for(engine_error, "json_schema") is engine_error  # the request's own field
    assert P.grammar_error_for(engine_error, None) is engine_error
    other = InvalidRequestError("bad n", param="n")
    assert P.grammar_error_for(other, "response_format") is other
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    assert chat_request(response_format=fmt).grammar_param == "response_format"
    assert chat_request(guided_choice=["a"]).grammar_param == "guided_choice"
    assert chat_request().grammar_param is None
    text_format = {"format": {"type": "json_schema", "schema": {}}}
    assert P.decode_request("responses", body_of(input="hi", text=text_format)).grammar_param == "text"
    with pytest.raises(InvalidRequestError) as info, P.grammar_errors("choice"):
        raise InvalidRequestError("ebnf: parser error", param="ebnf")
    assert (info.value.param, info.value.message) == ("choice", "Invalid 'choice': parser error")


def test_prompt_id_checks():
    P.check_prompt_ids([0, VOCAB - 1], VOCAB)
    with pytest.raises(InvalidRequestError) as info:
        P.check_prompt_ids([1, VOCAB], VOCAB)
    assert info.value.param == "prompt"


# --- stop strings, int64 bounds, /generate's param names, reasoning-only input ---------------------------------


def test_stop_strings_are_capped_in_length_on_every_route():
    limit = P.MAX_STOP_SEQUENCE_CHARS
    assert 256 <= limit <= 4096  # generous for a stop sequence; bounded for the engine's stop checker
    longest = "x" * limit
    assert P.to_sampling_params(chat_request(stop=["a", longest]), VOCAB, CTX, 5).stop == ["a", longest]
    native = P.decode_request("generate", body_of(text="a", sampling_params={"stop": longest}))
    assert native.engine_kwargs()["sampling_params"].stop == longest
    with pytest.raises(InvalidRequestError) as info:
        P.to_sampling_params(chat_request(stop=["a", longest + "x"]), VOCAB, CTX, 5)
    assert (info.value.param, info.value.code, info.value.message) == (
        "stop",
        "string_above_max_length",
        f"Invalid 'stop[1]': string too long. Expected a string with maximum length {limit}, but got a string "
        f"with length {limit + 1} instead.",
    )
    with pytest.raises(InvalidRequestError, match=r"^Invalid 'sampling_params\[1\].stop': string too long"):
        P.decode_request("generate", body_of(text=["a", "b"], sampling_params=[{}, {"stop": longest + "x"}]))
    # an empty stop string would match before any text: a 400 on every route, never an instantly ended request
    for make in (
        lambda: P.to_sampling_params(chat_request(stop=["a", ""]), VOCAB, CTX, 5),
        lambda: P.decode_request("generate", body_of(text="a", sampling_params={"stop": ["a", ""]})),
    ):
        with pytest.raises(InvalidRequestError, match=r"stop\[1\]': an empty string") as info:
            make()
        assert info.value.param == "stop"


BIG = 2**70  # past int64 (and uint64): never to reach numpy or torch
M_LP = {"messages": [USER], "logprobs": True}
# (kind, body without the field, field, the param the 400 names; None: the field's own name)
INT_FIELDS = [
    *(("chat", {"messages": [USER]}, f, None) for f in ("n", "seed", "top_k", "min_tokens", "priority")),
    *(("chat", {"messages": [USER]}, f, None) for f in ("max_tokens", "max_completion_tokens")),
    ("chat", M_LP, "top_logprobs", None),
    *(("completion", {"prompt": "x"}, f, None) for f in ("n", "logprobs", "prompt_logprobs", "max_tokens")),
    *(("completion", {"prompt": "x"}, f, None) for f in ("top_k", "priority", "seed", "min_tokens")),
    *(("responses", {"input": "hi"}, f, None) for f in ("max_output_tokens", "seed", "top_k")),
    *(("generate", {"text": "a"}, f, None) for f in ("logprob_start_len", "top_logprobs_num", "priority")),
    *(
        ("generate", {"text": "a"}, f"sampling_params.{f}", f)
        for f in ("max_new_tokens", "max_tokens", "top_k", "n", "seed")
    ),
    ("generate", {"text": "a"}, "sampling_params.min_new_tokens", "min_new_tokens"),
    ("generate", {"text": "a"}, "sampling_params.min_tokens", "min_tokens"),
]


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("kind, base, field, param", INT_FIELDS)
def test_integers_past_int64_are_400s_naming_the_param(kind, base, field, param, sign):
    body = dict(base)
    if field.startswith("sampling_params."):
        body["sampling_params"] = {field.split(".", 1)[1]: sign * BIG}
    else:
        body[field] = sign * BIG
    with pytest.raises(InvalidRequestError) as info:
        req = P.decode_request(kind, body_of(**body))
        if kind == "responses":
            with P.responses_errors():
                P.to_sampling_params(req.to_chat(), VOCAB, CTX, 5)
        elif kind != "generate":
            P.to_sampling_params(req, VOCAB, CTX, 5)
    err = info.value
    assert err.status_code == 400 and err.param == (param or field), err.message
    assert err.message.startswith(("Invalid '", "This model's maximum context length")), err.message


def test_top_k_past_the_vocabulary_keeps_every_token():
    # the engine clamps a top_k at or above the vocabulary size to all tokens; only int64 is a hard bound
    assert P.to_sampling_params(chat_request(top_k=2**63 - 1), VOCAB, CTX, 5).top_k == 2**63 - 1
    assert P.decode_request("chat", body_of(messages=[USER], priority=-(2**63))).priority == -(2**63)


@pytest.mark.parametrize(
    "field, wrong_type, wrong_value",
    [
        ("max_new_tokens", "4", -1),
        ("temperature", "hot", -1),
        ("n", 1.5, 0),
        ("top_k", "all", -5),
        ("stop", 5, ""),
        ("stop_regex", 5, "("),
        ("max_tokens", "4", 2**64),
    ],
)
def test_generate_names_a_sampling_param_alike_for_type_and_value_errors(field, wrong_type, wrong_value):
    for value in (wrong_type, wrong_value):
        for sampling_params, where in (
            ({field: value}, "sampling_params"),
            ([{}, {field: value}], "sampling_params[1]"),
        ):
            with pytest.raises(InvalidRequestError) as info:
                P.decode_request("generate", body_of(text=["a", "b"], sampling_params=sampling_params))
            err = info.value
            assert err.param == field, err.message
            assert err.message.startswith(
                (f"Invalid '{where}.{field}'", f"Invalid type for '{where}.{field}'")
            )


def test_engine_errors_about_sampling_params_are_reworded_keeping_the_param():
    # what /generate's checks against the vocabulary raise (the ingress wraps them in sampling_params_errors)
    engine = InvalidRequestError(
        "stop_token_ids: token id 99 is outside the vocabulary", param="stop_token_ids"
    )
    with pytest.raises(InvalidRequestError) as info, P.sampling_params_errors():
        raise engine
    assert (info.value.param, info.value.message) == (
        "stop_token_ids",
        "Invalid 'sampling_params.stop_token_ids': token id 99 is outside the vocabulary",
    )
    budget = InvalidRequestError("This model's maximum context length is 8 tokens.", param="max_new_tokens")
    image = InvalidRequestError("image_data: 9 images, over the limit of 4", param="image_data")
    for other in (budget, image):
        assert P.sampling_params_error(other) is other


def test_responses_input_of_only_reasoning_items():
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": []}
    for body in (
        body_of(input=[reasoning]),
        body_of(input=[reasoning, reasoning], instructions="Be brief."),
    ):
        with pytest.raises(InvalidRequestError) as info:
            P.decode_request("responses", body)
        assert info.value.param == "input"
        assert "only reasoning items" in info.value.message and "empty array" not in info.value.message
    ok = P.decode_request("responses", body_of(input=[reasoning, {"role": "user", "content": "Hi"}]))
    assert [m.role for m in ok.to_chat().messages] == ["user"]
