"""The language without a server: choice methods, chat-template role strings, expressions and their errors."""

from __future__ import annotations

import copy

import pytest

import sgl_ray
import sgl_ray.lang as sgl
from sgl_ray.errors import InvalidRequestError, ModelNotFoundError, RemoteError
from sgl_ray.lang.backends.http import error_from_body
from sgl_ray.lang.ir import Concat, Gen, GenParams, RoleBegin, RoleEnd, Text
from sgl_ray.model_loader import load_tokenizer, resolve_model


def test_token_length_normalized_picks_highest_mean():
    d = sgl.token_length_normalized.decide([[-1.0], [-0.2, -0.4], [-3.0, -0.1, -0.1]])
    assert d.index == 1
    assert d.scores == pytest.approx([-1.0, -0.3, -3.2 / 3])


def test_greedy_token_selection_breaks_prefix_ties_with_the_mean():
    # "organ" vs "organism": same first token; the shorter is padded with its mean (-0.1) and beats -0.3.
    assert sgl.greedy_token_selection.decide([[-0.1], [-0.1, -0.3], [-0.4, -0.01]]).index == 0
    assert sgl.greedy_token_selection.decide([[-0.5], [-0.1, -9.0]]).index == 1  # first token decides


def test_unconditional_likelihood_normalized_discounts_common_choices():
    cond = [[-1.0, -1.0], [-2.0]]
    uncond = [[-0.5, -0.5], [-4.0]]
    d = sgl.unconditional_likelihood_normalized.decide(cond, uncond)
    assert d.index == 1 and d.scores == pytest.approx([-0.5, 2.0])
    with pytest.raises(ValueError):
        sgl.unconditional_likelihood_normalized.decide(cond)


# A Llama-3-style template (BOS first, headers per turn) and one that refuses system turns, written for the test.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ],
]


@pytest.mark.parametrize(
    "template", [None, LLAMA3_STYLE, NO_SYSTEM], ids=["smollm2", "llama3-style", "no-system"]
)
def test_role_format_renders_like_the_chat_template(smollm2_path, template):
    tok = copy.deepcopy(load_tokenizer(resolve_model(smollm2_path)))
    if template is not None:
        tok.chat_template = template
    fmt = sgl.role_format_from_tokenizer(tok)
    for msgs in CONVERSATIONS:
        if template == NO_SYSTEM and msgs[0]["role"] == "system":
            assert fmt.prefix["system"] == fmt.suffix["system"] == ""
            continue
        text = fmt.begin + ("" if msgs[0]["role"] == "system" else fmt.default_system)
        for m in msgs:
            text += fmt.prefix[m["role"]] + m["content"] + fmt.suffix[m["role"]]
        gen_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text + fmt.prefix["assistant"] == gen_prompt
    assert sgl.RoleFormat.from_dict(fmt.to_dict()) == fmt
    if template == LLAMA3_STYLE:
        assert fmt.begin == tok.bos_token and not fmt.prefix["system"].startswith(tok.bos_token)


def test_expressions_compose_and_validate():
    e = "Q: " + sgl.gen("a", max_tokens=4) + "!"
    assert isinstance(e, Concat) and [type(x) for x in e.items] == [Text, Gen, Text]
    assert sgl.user("hi").items == (RoleBegin("user"), Text("hi"), RoleEnd("user"))
    assert isinstance(sgl.gen("x", choices=["a", "b"]), type(sgl.select("x", ["a", "b"])))
    g = sgl.gen("j", json_schema={"type": "object"})
    assert g.params.to_native() == {"json_schema": '{"type": "object"}'}
    merged = GenParams(max_new_tokens=4).merged(GenParams(max_new_tokens=128, temperature=0.0))
    assert merged.to_native() == {"max_new_tokens": 4, "temperature": 0.0}
    for bad in (
        lambda: sgl.select("x", []),
        lambda: sgl.select("x", ["a", "a"]),
        lambda: sgl.gen(max_tokens=-1),
    ):
        with pytest.raises(InvalidRequestError):
            bad()
    with pytest.raises(InvalidRequestError):
        sgl.gen("x", regex="a+", json_schema={"type": "string"})


def test_gen_with_tools_validates_them_when_written():
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    g = sgl.gen("call", tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert g.tools.tools == tuple(tools) and g.params.to_native() == {}
    for kwargs in (
        {"tool_choice": "required"},  # no tools
        {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
    ):
        with pytest.raises(InvalidRequestError):
            sgl.gen("call", **kwargs)


def test_run_without_a_backend_and_bad_programs():
    sgl.set_default_backend(None)

    @sgl_ray.function
    def prog(s):
        s += "x"

    with pytest.raises(InvalidRequestError, match="backend"):
        prog.run()
    with pytest.raises(InvalidRequestError, match="first argument"):
        sgl.function(lambda: None)
    with pytest.raises(InvalidRequestError):
        sgl.set_default_backend("http://nowhere")


def test_http_error_bodies_become_typed_errors():
    assert isinstance(error_from_body(400, {"error": {"message": "bad", "param": "x"}}), InvalidRequestError)
    assert isinstance(error_from_body(404, {"error": {"message": "no model"}}), ModelNotFoundError)
    e = error_from_body(401, {"error": {"message": "key", "type": "invalid_request_error"}})
    assert isinstance(e, RemoteError) and e.status_code == 401 and "key" in str(e)


def test_the_language_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, sgl_ray.lang; sys.exit(1 if 'ray' in sys.modules or 'openai' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
