"""The Responses API protocol without a server: requests → the chat request they mean, 400s under the Responses
API's names, and engine outputs → a response object or its events, read back by the official client's own stream
accumulator (``client.responses.stream``'s state machine)."""

from __future__ import annotations

import json

import pytest

from sgl_ray import protocol as P
from sgl_ray.errors import InvalidRequestError
from sgl_ray.reasoning import get_reasoning_parser
from sgl_ray.scheduler.output import RequestOutput

from .protocol_helpers import CTX, VOCAB

openai = pytest.importorskip("openai")

TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
THINKING = "<think>It is a weather question.</think>\n"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _request(**body) -> P.ResponsesRequest:
    return P.decode_request("responses", json.dumps({"model": "m", "input": "Hi", **body}).encode())


def _outputs(text: str, finish: dict, piece: int = 3) -> list[RequestOutput]:
    chunks = [text[i : i + piece] for i in range(0, len(text), piece)]
    return [
        RequestOutput(
            rid="r",
            token_ids=[5],
            text=chunk,
            finished=k == len(chunks) - 1,
            finish_reason=finish if k == len(chunks) - 1 else None,
            prompt_tokens=7,
            completion_tokens=k + 1,
            cached_tokens=0,
        )
        for k, chunk in enumerate(chunks)
    ]


def _run(req: P.ResponsesRequest, text: str, finish: dict, reasoning: str | None = None):
    """The whole response, and the stream's events as JSON, for the same outputs."""
    chat = req.to_chat()
    parsing = P.chat_output_parsing(chat, "hermes", get_reasoning_parser(reasoning) if reasoning else None)
    builder = P.ResponseBuilder(P.ResponseDraft(req, "m"), parsing)
    stream = P.ResponseStreamAssembler(P.ResponseDraft(req, "m"), parsing)
    events = stream.start()
    for out in _outputs(text, finish):
        builder.add(0, out)
        events += stream.add(0, out)
    events += stream.finish()
    return json.loads(P.encode(builder.build())), [json.loads(P.encode(e)) for e in events]


def _client_final(events: list[dict], tools=None):
    """The final response as ``client.responses.stream`` assembles it from the events (it checks their order)."""
    from openai._models import construct_type
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent

    state = ResponseStreamState(input_tools=tools or [], text_format=openai.omit)
    for event in events:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=event))
    return state._completed_response


def _strip_ids(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]


def test_items_become_chat_messages():
    req = _request(
        instructions="Be brief.",
        input=[
            {
                "role": "developer",
                "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
            },
            {"role": "user", "content": "weather?"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me see."}],
            },
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {
                "type": "function_call",
                "call_id": "c2",
                "name": "get_weather",
                "arguments": '{"city": "Rome"}',
            },
            {"type": "function_call_output", "call_id": "c1", "output": "18"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "21"}],
            },
        ],
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=9,
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
    )
    chat = req.to_chat()
    assert [(m.role, m.text()) for m in chat.messages] == [
        ("system", "Be brief."),
        ("developer", "a\nb"),
        ("user", "weather?"),
        ("assistant", "Let me see."),
        ("tool", "18"),
        ("tool", "21"),
    ]
    assert [c["id"] for c in chat.messages[3].tool_calls] == ["c1", "c2"]
    assert chat.tools == [
        {"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}
    ]
    assert chat.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert chat.max_completion_tokens == 9 and chat.response_format.json_schema.schema_ == {"type": "object"}


def test_chat_errors_are_renamed():
    req = _request(max_output_tokens=0)
    with pytest.raises(InvalidRequestError) as err, P.responses_errors():
        P.to_sampling_params(req.to_chat(), VOCAB, CTX, prompt_len=10)
    assert err.value.param == "max_output_tokens" and "'max_output_tokens'" in err.value.message
    with pytest.raises(InvalidRequestError) as err, P.responses_errors():
        P.to_sampling_params(req.to_chat(), VOCAB, CTX, prompt_len=CTX)
    assert err.value.param == "input" and "messages" not in err.value.message


def test_reasoning_text_and_calls_stream_as_the_whole_response():
    req = _request(tools=TOOLS, stream=True)
    whole, events = _run(req, THINKING + "Sure." + CALL, {"type": "stop", "matched": 2}, reasoning="think")
    assert [item["type"] for item in whole["output"]] == ["reasoning", "message", "function_call"]
    assert whole["output"][0]["content"] == [{"type": "reasoning_text", "text": "It is a weather question."}]
    assert whole["output"][2]["arguments"] == '{"city": "Paris"}' and whole["status"] == "completed"
    assert whole["usage"]["output_tokens_details"]["reasoning_tokens"] == len(THINKING) // 3
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    assert _strip_ids(events[-1]["response"]["output"]) == _strip_ids(whole["output"])
    final = _client_final(events, TOOLS)
    assert final.output_text == "Sure." and [o.type for o in final.output] == [
        "reasoning",
        "message",
        "function_call",
    ]


def test_cut_short_is_incomplete_and_an_empty_answer_is_a_message():
    req = _request()
    whole, events = _run(req, "The answer is", {"type": "length", "length": 5})
    assert whole["status"] == "incomplete" and whole["incomplete_details"] == {"reason": "max_output_tokens"}
    assert whole["output"][0]["status"] == "incomplete"
    assert events[-1]["type"] == "response.incomplete" and _client_final(events) is None  # no completed event
    whole, events = _run(_request(), "", {"type": "stop", "matched": 2})
    assert [e["type"] for e in events][2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert _strip_ids(events[-1]["response"]["output"]) == _strip_ids(whole["output"])
    assert whole["output"][0]["content"][0]["text"] == ""


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools"),
        ({"input": [{"type": "function_call_output", "call_id": "x", "output": "y"}]}, "input"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input"),
        ({"input": 5}, "input"),
    ],
)
def test_unsupported_and_bad_requests_name_the_parameter(body, param):
    with pytest.raises(InvalidRequestError) as err:
        _request(**body)
    assert err.value.param == param
