"""``POST /v1/responses`` through the session's Serve app with the official ``openai`` client.

The Responses API runs on the chat path, so each request is checked against the chat completion it means (same
prompt tokens, same greedy text). Tool calls use SmolLM2's default (hermes) format, sampled with a seed as in
``test_tool_calls.py``.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]

MODEL = "smollm2"
SYSTEM = "You are a concise assistant."
QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
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
    {"type": "function", "name": name, "description": f"{name} tool", "parameters": schema}
    for name, schema in SCHEMAS.items()
]
ASK = "What is the weather in Paris?"
SAMPLED = {"temperature": 0.7, "extra_body": {"seed": 7}}


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function_call" and call.call_id.startswith("call_") and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_plain_response_is_the_chat_completion(client):
    r = client.responses.create(
        model=MODEL, instructions=SYSTEM, input=QUESTION, max_output_tokens=8, temperature=0,
        store=True, metadata={"run": "test"},
    )  # fmt: skip
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.store is False and r.metadata == {"run": "test"}
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [part.type for part in message.content] == ["output_text"]
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )

    # the same conversation as message items with content parts
    items = [
        {"role": "developer", "content": [{"type": "input_text", "text": SYSTEM}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    again = client.responses.create(model=MODEL, input=items, max_output_tokens=8, temperature=0)
    assert again.output_text == r.output_text and again.usage.input_tokens == r.usage.input_tokens


def test_streamed_events_reassemble_the_response(client):
    kwargs = {
        "model": MODEL,
        "instructions": SYSTEM,
        "input": QUESTION,
        "max_output_tokens": 8,
        "temperature": 0,
    }
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    final = "response.completed" if whole.status == "completed" else "response.incomplete"
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1 and types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {events[2].item.id}
    last = events[-1].response
    assert last.id == events[0].response.id and last.output_text == text and last.status == whole.status
    assert last.usage.output_tokens == whole.usage.output_tokens


def test_required_and_named_function_calls(client):
    r = client.responses.create(
        model=MODEL, input=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_output_tokens=80, **SAMPLED,
    )  # fmt: skip
    assert r.status == "completed" and r.output_text == ""
    assert [item.type for item in r.output] == ["function_call"]
    _check_calls(r.output)
    # the output items go back as input (as the client gives them), with the call's result
    follow = client.responses.create(
        model=MODEL, tools=TOOLS, tool_choice="none", max_output_tokens=4, temperature=0,
        input=[
            {"role": "user", "content": ASK},
            *[item.model_dump(exclude_none=True) for item in r.output],
            {"type": "function_call_output", "call_id": r.output[0].call_id, "output": "18 degrees and sunny"},
        ],
    )  # fmt: skip
    assert [item.type for item in follow.output] == ["message"]

    # a named function, streamed through the client's own event accumulator
    named = {"type": "function", "name": "get_time"}
    with client.responses.stream(
        model=MODEL, input=ASK, tools=TOOLS, tool_choice=named, max_output_tokens=64, **SAMPLED
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    [call] = final.output
    assert call.name == "get_time"
    _check_calls([call])
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args == done.arguments == call.arguments
    whole = client.responses.create(
        model=MODEL, input=ASK, tools=TOOLS, tool_choice=named, max_output_tokens=64, **SAMPLED
    )
    assert (whole.output[0].name, whole.output[0].arguments) == (call.name, call.arguments)


def test_function_call_output_round_trip(client):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": '{"city": "Paris", "unit": "celsius"}'}  # fmt: skip
    items = [
        {"role": "user", "content": ASK},
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees and sunny"},
    ]
    r = client.responses.create(model=MODEL, input=items, tools=TOOLS, max_output_tokens=8, temperature=0)
    assert r.output[0].type == "message"

    # the chat request it means: the call in an assistant turn, its result in a tool message
    messages = [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]  # fmt: skip
    chat_tools = [
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS
    ]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, tools=chat_tools, max_tokens=8, temperature=0
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == (chat.choices[0].message.content or "")


BAD = [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]}, "input"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
        "input",
    ),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": []}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3.0}, "temperature"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
]


def test_bad_requests_are_400s_and_the_server_keeps_serving(client):
    for kwargs, param in BAD:
        kwargs = {"input": ASK, **kwargs}
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(
                model=MODEL, max_output_tokens=kwargs.pop("max_output_tokens", 4), **kwargs
            )
        body = err.value.body
        assert (body["type"], body["param"]) == ("invalid_request_error", param), (kwargs, body)
    ok = client.responses.create(model=MODEL, input=ASK, max_output_tokens=2, temperature=0)
    assert ok.usage.output_tokens == 2 and ok.status == "incomplete"
