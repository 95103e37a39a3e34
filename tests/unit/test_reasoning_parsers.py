"""Reasoning parsers on written-out model outputs, whole and streamed; the grammar that applies after the
reasoning, compiled by xgrammar against SmolLM2's tokenizer."""

from __future__ import annotations

import json
import random

import pytest

from sgl_ray.errors import InvalidRequestError
from sgl_ray.reasoning import REASONING_PARSERS, ReasoningSplit, after_reasoning, get_reasoning_parser

CASES = [
    ("think", "<think>\nAdd them.\n</think>\n\nFour.", ("Add them.\n", "Four.")),
    ("think", "  <think>a<b</think>b", ("a<b", "b")),
    ("think", "Four, no thinking.", ("", "Four, no thinking.")),
    ("think", "<think>cut short by max_tokens", ("cut short by max_tokens", "")),
    ("think", "<thin", ("", "<thin")),
    ("qwen3", "<think>\n\n</think>\n\nFour.", ("", "Four.")),
    ("qwen3", "The answer is </think> here", ("", "The answer is </think> here")),
    ("deepseek-r1", "Add them.\n</think>\n\nFour.", ("Add them.\n", "Four.")),
    ("deepseek-r1", "<think>\nAdd them.</think>Four.", ("Add them.", "Four.")),
    ("deepseek-r1", "Still thinking </thi", ("Still thinking </thi", "")),
    ("deepseek-r1", "", ("", "")),
]


def _stream(parser, pieces):
    parts = [parser.feed(p) for p in pieces] + [parser.flush()]
    return ReasoningSplit("".join(p.reasoning for p in parts), "".join(p.content for p in parts))


@pytest.mark.parametrize(
    ("name", "text", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_whole_and_streamed(name, text, expected):
    cls = get_reasoning_parser(name)
    assert cls().parse(text) == expected
    assert _stream(cls(), list(text)) == expected
    rng = random.Random(0)
    for _ in range(5):
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert _stream(cls(), pieces) == expected


def test_reasoning_streams_before_the_end_marker():
    parser = get_reasoning_parser("deepseek-r1")()
    assert parser.feed("Let me think</th") == ("Let me think", "")
    assert parser.feed("ink>\n\nIt") == ("", "It")
    assert parser.feed(" is 4.") == ("", " is 4.")


def test_unknown_parser_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match="deepseek-r1"):
        get_reasoning_parser("o1")
    assert set(REASONING_PARSERS) == {"think", "qwen3", "deepseek-r1"}


@pytest.fixture(scope="module")
def compiler(smollm2_path):
    xgr = pytest.importorskip("xgrammar")
    from sgl_ray.model_loader import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(smollm2_path))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=49152, stop_token_ids=[2])
    return xgr.GrammarCompiler(info, max_threads=1)


def test_grammar_applies_after_the_reasoning(compiler):
    import xgrammar as xgr

    from sgl_ray.function_call.base import json_schema_format

    answer = json_schema_format(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    )

    def accepts(name, text):
        grammar = compiler.compile_structural_tag(
            json.dumps(after_reasoning(get_reasoning_parser(name), answer))
        )
        m = xgr.GrammarMatcher(grammar)
        return m.accept_string(text) and m.accept_token(2)

    assert accepts("qwen3", '<think>\n{"n": "not yet"} hmm\n</think>\n\n{"n": 4}')
    assert accepts("qwen3", '{"n": 4}')  # thinking off: the answer alone
    assert not accepts("qwen3", "<think>x</think>\n\nFour")
    assert accepts("deepseek-r1", 'Two and two.\n</think>\n\n{"n": 4}')
    assert not accepts("deepseek-r1", '{"n": 4}')  # the reasoning block is not optional for R1
