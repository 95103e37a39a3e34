"""Tool-call parsers on written-out model outputs: whole, streamed char by char and in random pieces, malformed and
cut short; their forced call formats compiled by xgrammar against SmolLM2's tokenizer."""

from __future__ import annotations

import json
import random

import pytest

from sgl_ray.function_call import (
    TOOL_CALL_PARSERS,
    ParsedText,
    Tool,
    ToolCall,
    detect_tool_call_parser,
    get_tool_call_parser,
)
from sgl_ray.function_call.json_scan import InvalidJSON, value_end

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}
TOOLS = [Tool("get_weather", WEATHER), Tool("get_time", {"type": "object", "properties": {}})]
PARIS = ToolCall("get_weather", '{"city": "Paris", "unit": "c"}')
TIME = ToolCall("get_time", "{}")

# (parser, model output, expected content, expected calls), as each family writes them
CASES = [
    (
        "qwen25",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me look.\n",
        [PARIS, TIME],
    ),
    ("hermes", 'No tools needed: {"a": [1, 2]} <b>ok</b>', 'No tools needed: {"a": [1, 2]} <b>ok</b>', []),
    (
        "hermes",  # arguments as a JSON string, keys in another order
        '<tool_call>{"arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"c\\"}", "name": "get_weather"}</tool_call>',
        "",
        [PARIS],
    ),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', "", [PARIS]),
    (
        "llama3",
        'Sure.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
        '{"name": "get_time", "parameters": {}}',
        "Sure.",
        [PARIS, TIME],
    ),
    ("llama3", '{"answer": 42, "name": "x"}', '{"answer": 42, "name": "x"}', []),
    (
        "mistral",
        'Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
        '{"name": "get_time", "arguments": {}}]',
        "Checking. ",
        [PARIS, TIME],
    ),
    (
        "deepseekv3",
        "Here.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris", "unit": "c"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>'
        "get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "Here.",
        [PARIS, TIME],
    ),
    (
        "deepseekv3",  # V3.1 writes the name before the separator and the arguments bare
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "unit": "c"}'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "",
        [PARIS],
    ),
    ("pythonic", "[get_weather(city='Paris', unit=\"c\"), get_time()]", "", [PARIS, TIME]),
    ("pythonic", "See [the docs](x) and [1, 2]: [get_time()]", "See [the docs](x) and [1, 2]: ", [TIME]),
]
IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(CASES)]


def _stream(parser, pieces: list[str]) -> ParsedText:
    """Feed ``pieces`` and reassemble the deltas, checking their shape: a call's first piece names it, later
    pieces only add argument text, calls appear in index order."""
    content, calls = "", []
    deltas = [parser.feed(p) for p in pieces] + [parser.flush()]
    for d in deltas:
        content += d.content
        for piece in d.calls:
            if piece.name is not None:
                assert piece.index == len(calls) and piece.arguments == ""
                calls.append([piece.name, ""])
            else:
                calls[piece.index][1] += piece.arguments
    return ParsedText(content, [ToolCall(*c) for c in calls])


def _pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 7)
        out.append(text[i : i + k])
        i += k
    return out


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES, ids=IDS)
def test_whole_and_streamed(name, text, content, calls):
    cls = get_tool_call_parser(name)
    assert cls(TOOLS).parse(text) == ParsedText(content, calls)
    assert _stream(cls(TOOLS), list(text)) == ParsedText(content, calls)
    for seed in range(5):
        assert _stream(cls(TOOLS), _pieces(text, seed)) == ParsedText(content, calls)


def test_arguments_stream_in_pieces_and_names_come_first():
    parser = get_tool_call_parser("qwen25")(TOOLS)
    head = '<tool_call>\n{"name": "get_weather", "arguments": {"ci'
    first = parser.feed(head)
    assert first.content == "" and [(c.name, c.arguments) for c in first.calls] == [
        ("get_weather", ""),
        (None, '{"ci'),
    ]
    second = parser.feed('ty": "Par')
    assert [(c.index, c.name, c.arguments) for c in second.calls] == [(0, None, 'ty": "Par')]
    rest = parser.feed('is"}}\n</tool_call>')
    assert "".join(c.arguments for c in rest.calls) == 'is"}' and parser.flush().calls == []


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("qwen25", "<tool_call>\nnot json\n</tool_call> after"),
        ("qwen25", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),  # not one of the tools
        ("qwen25", '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>'),
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}'),  # cut short
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Pa'),
        ("mistral", "[TOOL_CALLS] hello"),
        (
            "deepseekv3",
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{oops",
        ),
        ("pythonic", "[get_weather(city=open('x'))]"),
        ("pythonic", "[get_weather('Paris')]"),
        ("pythonic", "[get_weather(city='Par"),
        ("qwen25", "Done. <tool_"),  # a partial marker at the end is text
    ],
)
def test_malformed_or_cut_calls_are_content(name, text):
    cls = get_tool_call_parser(name)
    assert cls(TOOLS).parse(text) == ParsedText(text, [])
    streamed = _stream(cls(TOOLS), _pieces(text, 1))
    if streamed.calls:  # a call whose name was streamed stays a call, cut where the text ended
        assert len(streamed.calls) == 1 and text.startswith(streamed.content)
        assert streamed.calls[0].name == "get_weather"
    else:
        assert streamed == ParsedText(text, [])


def test_a_complete_call_without_its_closing_marker_and_a_bad_second_call():
    hermes = get_tool_call_parser("hermes")(TOOLS)
    assert hermes.parse('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool').calls == [TIME]
    llama = get_tool_call_parser("llama3")(TOOLS)
    text = '{"name": "get_time", "parameters": {}}; {"name": "nope", "parameters": {}}'
    assert llama.parse(text) == ParsedText(' {"name": "nope", "parameters": {}}', [TIME])


def test_max_calls_keeps_the_first():
    text = CASES[0][1]
    assert get_tool_call_parser("qwen25")(TOOLS, max_calls=1).parse(text).calls == [PARIS]
    assert _stream(get_tool_call_parser("qwen25")(TOOLS, max_calls=1), list(text)).calls == [PARIS]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "{% for tool_call in message.tool_calls %}<tool_call>\n{{ tool_call | tojson }}</tool_call>",
            "qwen25",
        ),
        ("{{- '<|python_tag|>' + tool_call.name }}", "llama3"),
        ("{{ '[TOOL_CALLS] ' + message.tool_calls | tojson }}", "mistral"),
        ("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] }}", "deepseekv3"),
        ("Respond as [func_name1(params_name1=params_value1)]", "pythonic"),
        ("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", None),
        (None, None),
    ],
)
def test_parser_detected_from_the_chat_template(template, expected):
    assert detect_tool_call_parser(template) == expected


def test_json_scanner_prefixes():
    assert value_end('{"a": [1, {"b": "}"}], "c": -1.5e3} tail', 0) == 35
    assert value_end('{"a": [1, {"b": "}"}]', 0) is None
    assert value_end('{"a": tr', 0) is None and value_end('{"a": 12', 0) is None
    for bad in ('{"a" 1}', "{a: 1}", '{"a": 1]', '{"a": 01}', '{"a": nul}'):
        with pytest.raises(InvalidJSON):
            value_end(bad, 0)


@pytest.fixture(scope="module")
def compiler(smollm2_path):
    xgr = pytest.importorskip("xgrammar")
    from sgl_ray.model_loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(smollm2_path))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=49152, stop_token_ids=[2])
    return xgr.GrammarCompiler(info, max_threads=1)


@pytest.mark.parametrize("name", list(TOOL_CALL_PARSERS))
def test_forced_call_format_accepts_the_parsers_own_calls_only(name, compiler):
    import xgrammar as xgr

    parser = get_tool_call_parser(name)(TOOLS)
    for parallel, calls in ((True, [PARIS, TIME]), (False, [TIME])):
        grammar = compiler.compile_structural_tag(json.dumps(parser.structural_tag(TOOLS, parallel)))
        text = parser.format_calls(calls)
        assert parser.parse(text).calls == calls
        matcher = xgr.GrammarMatcher(grammar)
        assert matcher.accept_string(text) and matcher.accept_token(2) and matcher.is_terminated()
        if parallel:  # an argument outside the schema, plain text
            bad = parser.format_calls([ToolCall("get_weather", '{"city": 3}')])
            assert not xgr.GrammarMatcher(grammar).accept_string(bad)
            assert not xgr.GrammarMatcher(grammar).accept_string("Hello")
        else:  # one call only
            assert not xgr.GrammarMatcher(grammar).accept_string(parser.format_calls([TIME, TIME]))


@pytest.mark.parametrize("name", list(TOOL_CALL_PARSERS))
def test_mangled_outputs_never_raise(name):
    """Cut, spliced and sprinkled outputs: no exception; the whole-text parse keeps or drops text only as calls,
    and the stream never sends more content than the text holds."""
    cls = get_tool_call_parser(name)
    rng = random.Random(name)
    noise = [
        '"',
        "\\",
        "{",
        "}",
        "[",
        "]",
        "(",
        ")",
        ",",
        ":",
        "<",
        ">",
        "\n",
        "x",
        "1e999",
        "\\u12",
        "'",
        "\x00",
    ]
    texts = [text for n, text, *_ in CASES if n in (name, "hermes" if name == "qwen25" else name)]
    texts += [cls(TOOLS).format_calls([PARIS, TIME])]
    for text in texts:
        for _ in range(40):
            chars = list(text)
            for _ in range(rng.randint(1, 4)):
                chars.insert(rng.randint(0, len(chars)), rng.choice(noise))
            mangled = "".join(chars)[: rng.randint(1, len(chars))]
            parsed = cls(TOOLS).parse(mangled)
            for call in parsed.calls:
                assert isinstance(json.loads(call.arguments), dict) and call.name in (
                    "get_weather",
                    "get_time",
                )
            streamed = _stream(cls(TOOLS), _pieces(mangled, rng.randint(0, 99)))
            assert len(streamed.content) <= len(mangled)


def test_raw_control_characters_in_arguments_come_back_escaped():
    """A grammar may let a raw control character into a string (JSON forbids them): the call still parses, whole
    and streamed alike, and its arguments reach the client as valid JSON with the character escaped."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\x0eris"}}\n</tool_call>'
    cls = get_tool_call_parser("hermes")
    out = cls(TOOLS).parse(text)
    assert [c.name for c in out.calls] == ["get_weather"]
    assert json.loads(out.calls[0].arguments) == {"city": "Pa\x0eris"}
    assert "\x0e" not in out.calls[0].arguments
    assert _stream(cls(TOOLS), list(text)) == out
