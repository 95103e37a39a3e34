"""``RequestSpec`` and ``normalize_batch`` (the Python ``Engine`` API's request building): every field it passes to
the scheduler is checked first, a bad one raising ``InvalidRequestError`` naming it, before any request of the call
is queued."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from sgl_ray.entrypoints.engine import Engine
from sgl_ray.entrypoints.requests import RequestSpec, normalize_batch, per_prompt_lora_names
from sgl_ray.errors import InvalidRequestError
from sgl_ray.sampling.params import SamplingParams

VOCAB = 1000
INT64_MAX = 2**63 - 1


def _reqs(**fields):
    spec = RequestSpec(**{"input_ids": [1, 2, 3], "params": SamplingParams(), **fields})
    return spec.to_reqs((2,), random.Random(0), VOCAB)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"priority": 2**70}, "priority"),
        ({"priority": 2**63}, "priority"),
        ({"priority": -(2**63) - 1}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"priority": "1"}, "priority"),
        ({"priority": None}, "priority"),
        ({"logprob_start_len": 2**70, "return_logprob": True}, "logprob_start_len"),
        ({"logprob_start_len": 2**63}, "logprob_start_len"),
        ({"logprob_start_len": -2}, "logprob_start_len"),
        ({"logprob_start_len": 0.5}, "logprob_start_len"),
        ({"top_logprobs_num": "3"}, "top_logprobs_num"),
        ({"top_logprobs_num": 2.0}, "top_logprobs_num"),
        ({"top_logprobs_num": True}, "top_logprobs_num"),
        ({"top_logprobs_num": 21}, "top_logprobs_num"),
        ({"top_logprobs_num": -1}, "top_logprobs_num"),
        ({"input_ids": "abc"}, "input_ids"),
        ({"input_ids": 5}, "input_ids"),
        ({"input_ids": [1, "2"]}, "input_ids"),
        ({"input_ids": [1, 2.0]}, "input_ids"),
        ({"input_ids": [[1, 2]]}, "input_ids"),
        ({"input_ids": [1, True]}, "input_ids"),
        ({"input_ids": [1, None]}, "input_ids"),
        ({"input_ids": [-1]}, "input_ids"),
        ({"input_ids": [2**63]}, "input_ids"),
        ({"input_ids": [2**70]}, "input_ids"),
        ({"input_ids": [VOCAB]}, "input_ids"),
        ({"input_ids": []}, "prompt"),  # the scheduler's name for it (a text prompt may encode to no tokens)
        ({"return_logprob": 1}, "return_logprob"),
        ({"return_logprob": "yes"}, "return_logprob"),
        ({"return_logprob": None}, "return_logprob"),
        ({"return_logprob": [True, False]}, "return_logprob"),  # one for the whole call, not per prompt
        ({"lora_name": 5}, "lora_path"),
        ({"lora_name": {"sql": None}}, "lora_path"),
        ({"lora_name": ["sql"]}, "lora_path"),
        ({"lora_name": b"sql"}, "lora_path"),
    ],
)
def test_a_bad_field_names_itself(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _reqs(**fields)
    assert info.value.param == param
    assert param in str(info.value)


def test_an_integer_too_long_to_print_is_shown_by_its_size_and_sign() -> None:
    """Past Python's int-to-str limit (4300 digits) ``str()`` raises: the message must still build."""
    with pytest.raises(InvalidRequestError) as info:
        _reqs(priority=-(10**5000))
    assert info.value.message.endswith("got a negative integer of 16610 bits")


def test_the_limits_themselves_are_valid() -> None:
    (req,) = _reqs(priority=-(2**63), logprob_start_len=INT64_MAX, top_logprobs_num=20, return_logprob=True)
    assert (req.priority, req.logprob_start_len, req.top_logprobs_num) == (-(2**63), INT64_MAX, 20)
    (req,) = _reqs(input_ids=(0, VOCAB - 1), priority=INT64_MAX, logprob_start_len=-1, top_logprobs_num=0)
    assert req.prompt_ids == [0, VOCAB - 1] and req.priority == INT64_MAX
    (req,) = _reqs(lora_name="sql", return_logprob=False)
    assert (req.lora_name, req.extra_key, req.return_logprob) == ("sql", "sql", False)
    assert _reqs(lora_name=None)[0].lora_name is None


def test_one_bad_prompt_of_a_batch_queues_nothing() -> None:
    added: list = []
    engine = SimpleNamespace(
        model_config=SimpleNamespace(vocab_size=VOCAB),
        eos_token_ids=(2,),
        _rng=random.Random(0),
        _core=SimpleNamespace(add=lambda reqs, sink: added.append(reqs)),
    )
    good = RequestSpec([1, 2], SamplingParams())
    for bad in (
        RequestSpec([1, 2], SamplingParams(), priority=2**70),
        RequestSpec([1, 2.5], SamplingParams()),
        RequestSpec([], SamplingParams()),  # a text prompt that encodes to no tokens
        RequestSpec([1, 2], SamplingParams(), return_logprob=[True]),  # type: ignore[arg-type]
        RequestSpec([1, 2], SamplingParams(), lora_name=7),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidRequestError):
            Engine._submit(engine, [good, bad, good], lambda out: None)  # type: ignore[arg-type]
    assert added == []
    Engine._submit(engine, [good, good], lambda out: None)  # type: ignore[arg-type]
    assert [len(reqs) for reqs in added] == [2]


@pytest.mark.parametrize(
    "input_ids",
    [
        5,
        {1: 2},
        np.array([1, 2]),
        b"ab",
        "ab",
        [True, 2],
        [[1, True]],
        [[1, [2]]],
        [1, 2.0],
        [[[1]]],
        iter([1]),
    ],
)
def test_input_ids_that_are_no_token_lists_name_the_field(input_ids) -> None:
    with pytest.raises(InvalidRequestError) as info:
        normalize_batch(None, input_ids)
    assert info.value.param == "input_ids"


@pytest.mark.parametrize("prompt", [5, {"a": 1}, [], ["a", 1], b"ab"])
def test_prompts_that_are_no_strings_name_the_field(prompt) -> None:
    with pytest.raises(InvalidRequestError) as info:
        normalize_batch(prompt, None)
    assert info.value.param == "prompt"


@pytest.mark.parametrize(
    ("input_ids", "shown"),
    [([[1, 2], []], "input_ids[1]"), ([[]], "input_ids[0]"), (([], [3]), "input_ids[0]"), ([], "input_ids")],
)
def test_an_empty_token_list_is_refused_before_queueing(input_ids, shown: str) -> None:
    """The scheduler can serve no prompt without a token: the batch is refused here, naming the entry."""
    with pytest.raises(InvalidRequestError) as info:
        normalize_batch(None, input_ids)
    assert info.value.param == "input_ids"
    assert str(info.value).startswith(f"{shown} is empty")


def test_empty_text_prompts_are_left_to_the_tokenizer() -> None:
    """A tokenizer may encode "" to its BOS token (Gemma's does): only an empty encoding is refused (by
    ``RequestSpec.check``, above)."""
    assert normalize_batch(["a", ""], None) == (["a", ""], None, True)
    assert normalize_batch("", None) == ([""], None, False)


@pytest.mark.parametrize(
    ("lora_path", "count", "expected"),
    [
        (None, 2, [None, None]),
        ("sql", 3, ["sql", "sql", "sql"]),
        (["sql", "chat", None], 3, ["sql", "chat", None]),
        (("sql",), 1, ["sql"]),
    ],
)
def test_lora_path_forms_give_one_adapter_per_prompt(lora_path, count: int, expected: list) -> None:
    assert per_prompt_lora_names(lora_path, count) == expected


@pytest.mark.parametrize(
    ("lora_path", "shown"),
    [
        (5, "got int"),
        ({"sql": None, "chat": None}, "got dict"),  # not silently its keys
        ({"sql", "chat"}, "got set"),
        (iter(["sql", "chat"]), "got list_iterator"),
        (b"sq", "got bytes"),
        (["sql"], "1 entries for 2"),
        (["sql", None, None], "3 entries for 2"),
        (["sql", 5], "lora_path[1]"),
        ([None, ["sql"]], "lora_path[1]"),
    ],
)
def test_a_bad_lora_path_names_itself(lora_path, shown: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        per_prompt_lora_names(lora_path, 2)
    assert info.value.param == "lora_path"
    assert shown in str(info.value)


def test_token_lists_and_prompts_still_normalize() -> None:
    assert normalize_batch(None, [1, 2]) == (None, [[1, 2]], False)
    assert normalize_batch(None, ([1], (2, 3))) == (None, [[1], [2, 3]], True)
    assert normalize_batch(None, range(3)) == (None, [[0, 1, 2]], False)
    assert normalize_batch("hi", None) == (["hi"], None, False)
    assert normalize_batch(("a", "b"), None) == (["a", "b"], None, True)
