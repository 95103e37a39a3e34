"""Tool calling through the session's Serve app with the official ``openai`` client.

SmolLM2's chat template shows no call format, so the server reads and forces the default (hermes) format:
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. The constrained requests sample with a seed:
greedy decoding keeps only the forced tokens the model agrees with, and this small model would spell the markers
in many short tokens (about 60 a call instead of about 30).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "smollm2"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _reassemble(stream) -> tuple[str, dict[int, dict], str | None]:
    """Content, calls by index (id, name, arguments) and the finish reason of a streamed choice; checks that each
    call's first delta carries id, type and name, and that later ones carry only argument text."""
    content, calls, reason = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.id and piece.type == "function" and piece.function.name
                    calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
                else:
                    assert piece.id is None and piece.function.name is None
                calls[piece.index]["arguments"] += piece.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, calls, reason


def test_required_and_named_function_calls_validate(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=80, temperature=0.7, seed=7,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls)

    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=64, temperature=0.7, seed=7
    )
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"] and r.choices[0].finish_reason == "tool_calls"
    _check_calls(calls)

    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice=named,
        max_tokens=64,
        temperature=0.7,
        seed=7,
        stream=True,
    )
    content, streamed, reason = _reassemble(stream)
    assert content == "" and reason == "tool_calls" and list(streamed) == [0]
    assert (streamed[0]["name"], streamed[0]["arguments"]) == (
        calls[0].function.name,
        calls[0].function.arguments,
    )


def test_required_streamed_parallel_calls(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=72, temperature=0.7, seed=7,
        stream=True,
    )  # fmt: skip
    content, calls, reason = _reassemble(stream)
    assert content == "" and reason in ("tool_calls", "length") and 0 in calls
    # one call or more: with "length" a call after the first may be cut short
    for index, call in calls.items():
        if reason == "tool_calls" or index == 0 or index < len(calls) - 1:
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert len({c["id"] for c in calls.values()}) == len(calls)


def test_multi_turn_with_a_tool_result_and_tool_choice_none(client, serve_url):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    choice = r.choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # the call and its result reach the model: the prompt is SmolLM2's ChatML with the call in the hermes format
    rendered = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n18 degrees and sunny<|im_end|>\n<|im_start|>assistant\n"
    )
    tokens = client.post(f"{serve_url}/tokenize", body={"text": rendered}, cast_to=object)["tokens"]
    assert r.usage.prompt_tokens == len(tokens)

    auto = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert auto.choices[0].message.content == choice.message.content  # the model wrote no call: plain content


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"tools": [{"type": "function", "function": {"description": "no name"}}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
        {"tools": TOOLS, "tool_choice": "sometimes"},
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        {"tools": TOOLS, "messages": ASK + [{"role": "tool", "content": "18 degrees"}]},
    ],
    ids=["unknown-function", "no-tools", "no-name", "not-object", "bad-choice", "with-grammar", "no-call-id"],
)
def test_bad_tool_requests_are_400s_and_the_server_keeps_serving(client, kwargs):
    kwargs = {"messages": ASK, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=4, **kwargs)
    assert err.value.body["type"] == "invalid_request_error"
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_separate_reasoning_needs_a_reasoning_parser(client, serve_url):
    with pytest.raises(openai.BadRequestError) as err:
        client.post(f"{serve_url}/generate", body={"text": "Hi", "separate_reasoning": True}, cast_to=object)
    assert err.value.body["param"] == "separate_reasoning"
