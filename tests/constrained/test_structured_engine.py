"""Structured outputs end to end on the default SmolLM2 model (greedy, CPU): JSON schemas validated with
``jsonschema``, regexes with ``re.fullmatch``, an EBNF grammar with a small parser, jump-forward on and off giving
the same tokens, mixed batches, typed errors, and the same through the Ray runtime."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import sgl_ray
from sgl_ray.errors import InvalidRequestError

from .schemas import EBNF_ARITHMETIC, REGEXES, SCHEMAS

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0.0, "max_new_tokens": 64}


def _schema_prompts() -> list[str]:
    return [f"Write {desc} as JSON:\n" for desc, _ in SCHEMAS]


def _schema_params() -> list[dict]:
    return [{**GREEDY, "json_schema": json.dumps(schema)} for _, schema in SCHEMAS]


@pytest.fixture(scope="module")
def engines(smollm2_path):
    """Jump-forward on and off (the default is on)."""
    jf = sgl_ray.Engine(smollm2_path, max_total_tokens=8192)
    step = sgl_ray.Engine(smollm2_path, max_total_tokens=8192, disable_jump_forward=True)
    yield {"jump": jf, "step": step}
    jf.shutdown()
    step.shutdown()


@pytest.fixture(scope="module")
def schema_outputs(engines):
    return {mode: eng.generate(_schema_prompts(), _schema_params()) for mode, eng in engines.items()}


@pytest.fixture(scope="module")
def regex_outputs(engines):
    params = [{**GREEDY, "max_new_tokens": 32, "regex": rx} for _, rx in REGEXES]
    return {mode: eng.generate([p for p, _ in REGEXES], params) for mode, eng in engines.items()}


@pytest.mark.parametrize("mode", ["jump", "step"])
def test_every_schema_output_validates(schema_outputs, mode):
    assert len(SCHEMAS) >= 20
    for (desc, schema), out in zip(SCHEMAS, schema_outputs[mode], strict=True):
        jsonschema.validate(json.loads(out["text"]), schema)
        # The grammar completed (and the model ended on EOS, the only token it allowed): finish reason "stop".
        assert out["meta_info"]["finish_reason"]["type"] == "stop", desc


def test_jump_forward_equals_step_by_step_and_saves_decode_steps(schema_outputs):
    jump, step = schema_outputs["jump"], schema_outputs["step"]
    for (desc, _), a, b in zip(SCHEMAS, jump, step, strict=True):
        assert a["output_ids"] == b["output_ids"], desc
        assert a["text"] == b["text"]
        ma, mb = a["meta_info"], b["meta_info"]
        assert mb["decode_steps"] == mb["completion_tokens"] and mb["jump_forward_tokens"] == 0
        assert ma["decode_steps"] + ma["jump_forward_tokens"] == ma["completion_tokens"]
    steps_jump = sum(o["meta_info"]["decode_steps"] for o in jump)
    steps_step = sum(o["meta_info"]["decode_steps"] for o in step)
    assert steps_step >= 1.5 * steps_jump  # schemas' keys and punctuation are forced spans


def test_constrained_steps_are_planned_ahead(engines, schema_outputs):
    """Overlap scheduling (on by default): a constrained request's next step is planned and launched before its
    token is back, the masks following once it is; with jump-forward, a request whose grammar forces a string
    waits for its token instead and jumps (the outputs above are still those of step-by-step decoding)."""
    step = engines["step"]._core.stats()["num_deferred_mask_steps"]
    jump = engines["jump"]._core.stats()["num_deferred_mask_steps"]
    assert step > 0 and jump > 0
    print(f"deferred-mask steps: {step} without jump-forward, {jump} with")


def test_deferred_masks_equal_synchronous_scheduling(tiny_llama_path):
    """Greedy JSON and seeded sampled regex requests, planned ahead with deferred masks vs one step at a time:
    the same tokens; the requests end (grammar complete) with their next step already in flight."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 6}},
    }
    params = [{**GREEDY, "max_new_tokens": 40, "json_schema": json.dumps(schema)}] * 3
    params += [{"temperature": 0.8, "seed": 5, "max_new_tokens": 40, "regex": "[a-z]{3,9}"}] * 3
    prompts = [f"Item {i}:" for i in range(len(params))]
    runs = {}
    for overlap in (True, False):
        with sgl_ray.Engine(
            tiny_llama_path,
            disable_jump_forward=True,
            disable_overlap_schedule=not overlap,
            max_total_tokens=4096,
        ) as eng:
            runs[overlap] = eng.generate(prompts, params)
            assert (eng._core.stats()["num_deferred_mask_steps"] > 0) == overlap
    assert [o["output_ids"] for o in runs[True]] == [o["output_ids"] for o in runs[False]]
    for out in runs[True][:3]:
        jsonschema.validate(json.loads(out["text"]), schema)
    assert all(re.fullmatch("[a-z]{3,9}", o["text"]) for o in runs[True][3:])


def test_regex_outputs_fullmatch_with_and_without_jump_forward(regex_outputs):
    for (_, rx), a, b in zip(REGEXES, regex_outputs["jump"], regex_outputs["step"], strict=True):
        assert re.fullmatch(rx, a["text"]), (rx, a["text"])
        assert a["output_ids"] == b["output_ids"]
        assert a["meta_info"]["finish_reason"]["type"] == "stop"


def _parse_expr(s: str, i: int = 0) -> int:
    """Recursive-descent check of EBNF_ARITHMETIC; returns the end index or raises ValueError."""

    def term(i: int) -> int:
        if i < len(s) and s[i] == "(":
            i = term(i + 1)
            if s[i : i + 3] not in (" + ", " - "):
                raise ValueError(f"operator expected at {i}")
            i = term(i + 3)
            if i >= len(s) or s[i] != ")":
                raise ValueError(f"')' expected at {i}")
            return i + 1
        m = re.match(r"[1-9][0-9]?", s[i:])
        if not m:
            raise ValueError(f"number expected at {i}")
        return i + m.end()

    def expr(i: int) -> int:
        i = term(i)
        for _ in range(2):
            if s[i : i + 3] not in (" + ", " - "):
                break
            i = term(i + 3)
        return i

    return expr(i)


def test_ebnf_grammar(engines):
    params = {**GREEDY, "max_new_tokens": 24, "ebnf": EBNF_ARITHMETIC}
    outs = [eng.generate("An arithmetic expression: ", params) for eng in engines.values()]
    text = outs[0]["text"]
    assert _parse_expr(text) == len(text), text
    assert outs[0]["meta_info"]["finish_reason"]["type"] == "stop"
    assert outs[0]["output_ids"] == outs[1]["output_ids"]


def test_mixed_batch_with_unconstrained_requests(engines, schema_outputs):
    eng = engines["jump"]
    plain = ["The capital of France is", "Once upon a time"]
    alone = eng.generate(plain, {**GREEDY, "max_new_tokens": 12})
    prompts = [_schema_prompts()[0], plain[0], _schema_prompts()[8], plain[1], REGEXES[0][0]]
    params = [
        _schema_params()[0],
        {**GREEDY, "max_new_tokens": 12},
        _schema_params()[8],
        {**GREEDY, "max_new_tokens": 12},
        {**GREEDY, "max_new_tokens": 32, "regex": REGEXES[0][1]},
    ]
    outs = eng.generate(prompts, params)
    assert [outs[1]["output_ids"], outs[3]["output_ids"]] == [a["output_ids"] for a in alone]
    assert outs[0]["output_ids"] == schema_outputs["jump"][0]["output_ids"]
    assert outs[2]["output_ids"] == schema_outputs["jump"][8]["output_ids"]
    assert re.fullmatch(REGEXES[0][1], outs[4]["text"])


def test_sampled_requests_with_jump_forward_stay_valid(engines):
    desc, schema = SCHEMAS[16]  # nested objects in an array
    params = {
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 96,
        "json_schema": schema,
        "seed": 1,
        "n": 3,
    }
    for out in engines["jump"].generate(f"Write {desc} as JSON:\n", params):
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            jsonschema.validate(json.loads(out["text"]), schema)
        assert out["meta_info"]["jump_forward_tokens"] > 0


@pytest.mark.parametrize(
    ("params", "param", "words"),
    [
        ({"json_schema": "{not json"}, "json_schema", "JSON"),
        (
            {"json_schema": '{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}'},
            "json_schema",
            "nope",
        ),
        ({"regex": "a(b"}, "regex", "parenthesis"),
        ({"ebnf": "root ::= undefined_rule"}, "ebnf", "undefined_rule"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf", "only one"),
        ({"regex": ""}, "regex", "non-empty"),
    ],
)
def test_invalid_grammars_are_typed_errors(engines, params, param, words):
    eng = engines["jump"]
    with pytest.raises(InvalidRequestError) as err:
        eng.generate("x", {**GREEDY, **params})
    assert err.value.param == param and words in str(err.value)
    assert (
        eng.generate("still serving", {**GREEDY, "max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    )


def test_a_slow_compile_fails_its_request_after_the_timeout_and_blocks_nobody(smollm2_path):
    """A grammar still compiling after ``grammar_compile_timeout`` fails its request with a typed error naming the
    limit; other structured requests are served meanwhile (a second compile thread), and once the compile has
    finished, the same grammar is served from the cache."""
    values = [f"value_{i}_{'x' * (i % 50)}" for i in range(3000)]
    heavy = json.dumps({"type": "string", "enum": values})  # 4-6 s to compile with xgrammar 0.2.8-0.2.9
    with sgl_ray.Engine(smollm2_path, max_total_tokens=4096, grammar_compile_timeout=0.5) as eng:
        with pytest.raises(InvalidRequestError) as err:
            eng.generate("x", {**GREEDY, "json_schema": heavy})
        assert err.value.param == "json_schema" and "grammar_compile_timeout" in str(err.value)
        out = eng.generate("Pick:", {**GREEDY, "regex": "(yes|no)"})  # a quick compile, not queued behind it
        assert out["text"] in ("yes", "no")
        for _ in range(120):  # the heavy compile goes on in the background; its result is cached
            try:
                out = eng.generate("x", {**GREEDY, "json_schema": heavy, "max_new_tokens": 4})
                break
            except InvalidRequestError:
                continue
        assert out["meta_info"]["completion_tokens"] == 4


@pytest.mark.ray
def test_structured_outputs_through_ray(ray_cluster, smollm2_path, schema_outputs):
    picks = [0, 8, 16]
    prompts = [_schema_prompts()[i] for i in picks] + ["The capital of France is"]
    params = [_schema_params()[i] for i in picks] + [{**GREEDY, "max_new_tokens": 8}]
    with sgl_ray.Engine(smollm2_path, use_ray=True, max_total_tokens=4096) as eng:
        outs = eng.generate(prompts, params)
        with pytest.raises(InvalidRequestError):
            eng.generate("x", {**GREEDY, "regex": "a(b"})
    for i, out in zip(picks, outs, strict=False):
        assert out["output_ids"] == schema_outputs["jump"][i]["output_ids"]
        # Through Ray, as in-process, constrained steps are planned ahead (their masks follow): a step already
        # planned samples the first forced token, and the jump follows.
        ray_meta, local = out["meta_info"], schema_outputs["jump"][i]["meta_info"]
        assert ray_meta["decode_steps"] + ray_meta["jump_forward_tokens"] == ray_meta["completion_tokens"]
        assert ray_meta["decode_steps"] == local["decode_steps"]
    assert outs[-1]["meta_info"]["completion_tokens"] == 8
