"""Tool calls and reasoning in the chat protocol: request checks, the engine grammar a request gets, and the
response bodies and stream chunks the assemblers build from engine outputs."""

from __future__ import annotations

import json

import msgspec
import pytest

from sgl_ray import protocol as P
from sgl_ray.errors import InvalidRequestError
from sgl_ray.reasoning import get_reasoning_parser
from sgl_ray.scheduler.output import RequestOutput

from .protocol_helpers import CTX, VOCAB, chat_request

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "get_time"}},
]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
STOP = {"type": "stop", "matched": 2}


def _out(text: str, finish=None, done=1) -> RequestOutput:
    return RequestOutput(
        rid="r",
        token_ids=[5],
        text=text,
        finished=finish is not None,
        finish_reason=finish,
        prompt_tokens=7,
        completion_tokens=done,
        cached_tokens=0,
    )


def _parsing(parser: str = "hermes", reasoning: str | None = None, **fields) -> P.OutputParsing:
    req = chat_request(**fields)
    return P.chat_output_parsing(req, parser, get_reasoning_parser(reasoning) if reasoning else None)


def _params(parser: str = "hermes", reasoning: str | None = None, **fields):
    req = chat_request(**fields)
    parsing = P.chat_output_parsing(req, parser, get_reasoning_parser(reasoning) if reasoning else None)
    return P.output_params(req, P.to_sampling_params(req, VOCAB, CTX, prompt_len=10), parsing)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools"),
        ({"messages": [{"role": "tool", "content": "4"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]}, "messages"),
    ],
)
def test_bad_tool_requests(fields, param):
    with pytest.raises(InvalidRequestError) as err:
        chat_request(**fields)
    assert err.value.param == param and err.value.status_code == 400


def test_engine_grammar_of_each_tool_choice():
    assert _params(tools=TOOLS).structural_tag is None  # auto: the model writes what it likes
    assert _params(tools=TOOLS, tool_choice="none").structural_tag is None
    required = json.loads(_params(tools=TOOLS, tool_choice="required").structural_tag)
    assert required["format"]["type"] == "tags_with_separator"
    assert [t["begin"] for t in required["format"]["tags"]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": ',
        '<tool_call>\n{"name": "get_time", "arguments": ',
    ]
    one = json.loads(_params(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).structural_tag)
    assert one["format"]["type"] == "or"
    named = {"type": "function", "function": {"name": "get_time"}}
    assert json.loads(_params(tools=TOOLS, tool_choice=named).structural_tag)["format"]["begin"].startswith(
        '<tool_call>\n{"name": "get_time"'
    )
    # markers that are special tokens stay in the text unless the request says otherwise
    assert _params("llama3", tools=TOOLS).skip_special_tokens is False
    assert _params("llama3", tools=TOOLS, skip_special_tokens=True).skip_special_tokens is True
    assert _params("hermes", tools=TOOLS).skip_special_tokens is True
    with pytest.raises(InvalidRequestError) as err:
        _params(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert err.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError, match="JSON schema"):
        bad = [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": 3}}}
        ]
        _params(tools=bad, tool_choice="required")


def test_a_grammar_moves_after_the_reasoning():
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    plain = _params(response_format=fmt)
    assert plain.json_schema is not None and plain.structural_tag is None
    params = _params(reasoning="deepseek-r1", response_format=fmt)
    assert params.json_schema is None and params.grammar[0] == "structural_tag"
    tag = json.loads(params.structural_tag)["format"]
    assert tag["type"] == "sequence" and tag["elements"][0]["end"] == "</think>"
    both = json.loads(_params(reasoning="qwen3", tools=TOOLS, tool_choice="required").structural_tag)[
        "format"
    ]
    assert both["type"] == "or" and both["elements"][1]["type"] == "tags_with_separator"
    assert _params(reasoning="qwen3", separate_reasoning=False, response_format=fmt).json_schema is not None


def test_response_with_tool_calls():
    builder = P.ChatResponseBuilder(model="m", parsing=_parsing(tools=TOOLS))
    for i, piece in enumerate((CALL_TEXT[:20], CALL_TEXT[20:])):
        builder.add(0, _out(piece, STOP if i else None, done=i + 1))
    body = msgspec.json.decode(P.encode(builder.build()))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and "reasoning_content" not in message
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.mark.parametrize(
    ("fields", "text", "finish", "reason"),
    [
        ({"tools": TOOLS, "tool_choice": "none"}, CALL_TEXT, STOP, "stop"),  # none: the text is content
        ({"tools": TOOLS}, "Paris is sunny.", STOP, "stop"),
        ({"tools": TOOLS}, CALL_TEXT[:-20], {"type": "length", "length": 9}, "length"),  # cut: content
        ({}, CALL_TEXT, STOP, "stop"),
    ],
)
def test_response_without_tool_calls(fields, text, finish, reason):
    builder = P.ChatResponseBuilder(model="m", parsing=_parsing(**fields))
    builder.add(0, _out(text, finish))
    body = msgspec.json.decode(P.encode(builder.build()))
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text} and choice["finish_reason"] == reason


def test_stream_with_reasoning_and_tool_calls():
    parsing = _parsing(reasoning="deepseek-r1", tools=TOOLS, n=2)
    asm = P.ChatStreamAssembler(model="m", n=2, parsing=parsing)
    text = "Need the weather.</think>\n\n" + CALL_TEXT
    chunks = []
    for index in (0, 1):
        for i, ch in enumerate(text):
            chunks += asm.add(index, _out(ch, STOP if i == len(text) - 1 else None, done=i + 1))
    bodies = [msgspec.json.decode(P.encode(c)) for c in chunks]
    for index in (0, 1):
        deltas = [b["choices"][0] for b in bodies if b["choices"][0]["index"] == index]
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(d["delta"].get("reasoning_content", "") for d in deltas) == "Need the weather."
        assert "".join(d["delta"].get("content", "") for d in deltas) == ""
        calls = [c for d in deltas for c in d["delta"].get("tool_calls", [])]
        assert calls[0] == {
            "index": 0,
            "id": calls[0]["id"],
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
        assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
        assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}' and len(calls) > 3
        assert [d["finish_reason"] for d in deltas][-1] == "tool_calls"
        assert all(d["finish_reason"] is None for d in deltas[:-1])

    builder = P.ChatResponseBuilder(model="m", parsing=parsing)
    builder.add(0, _out(text, STOP))
    message = msgspec.json.decode(P.encode(builder.build()))["choices"][0]["message"]
    assert message["reasoning_content"] == "Need the weather." and message["content"] is None


def test_messages_for_the_chat_template():
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    req = chat_request(
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    )
    dicts = P.message_dicts(req.messages)
    assert dicts[1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris"
    }  # templates expect an object
    assert dicts[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    from sgl_ray.function_call import get_tool_call_parser

    as_text = P.message_dicts(req.messages, get_tool_call_parser("mistral")([]).format_calls)
    assert as_text[1] == {"role": "assistant", "content": '[TOOL_CALLS] [{"name": "get_weather", '
                          '"arguments": {"city": "Paris"}}]'}  # fmt: skip


def test_parser_options_on_the_command_line():
    from sgl_ray.cli import build_parser
    from sgl_ray.configs.engine_args import EngineArgs
    from sgl_ray.deployments.serve_cli import app_args

    ns = build_parser().parse_args(["serve", "--tool-call-parser", "llama3", "--reasoning-parser", "qwen3"])
    args = app_args(ns)
    assert (args["tool_call_parser"], args["reasoning_parser"]) == ("llama3", "qwen3")
    for field, value in (("tool_call_parser", "gpt"), ("reasoning_parser", "o1")):
        with pytest.raises(InvalidRequestError) as err:
            EngineArgs(**{field: value})
        assert err.value.param == field
