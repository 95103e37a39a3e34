"""``RequestSpec`` and ``normalize_batch`` (the Python ``Engine`` API's request building): every field it passes to
the scheduler is checked first, a bad one raising ``InvalidRequestError`` naming it, before any request of the call
is queued."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from sgl_ray.entrypoints.engine import Engine
from sgl_ray.entrypoints.requests import RequestSpec, normalize_batch
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
    ],
)
def test_a_bad_field_names_itself(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _reqs(**fields)
    assert info.value.param == param
    assert param in str(info.value)


def test_the_limits_themselves_are_valid() -> None:
    (req,) = _reqs(priority=-(2**63), logprob_start_len=INT64_MAX, top_logprobs_num=20, return_logprob=True)
    assert (req.priority, req.logprob_start_len, req.top_logprobs_num) == (-(2**63), INT64_MAX, 20)
    (req,) = _reqs(input_ids=(0, VOCAB - 1), priority=INT64_MAX, logprob_start_len=-1, top_logprobs_num=0)
    assert req.prompt_ids == [0, VOCAB - 1] and req.priority == INT64_MAX


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


def test_token_lists_and_prompts_still_normalize() -> None:
    assert normalize_batch(None, [1, 2]) == (None, [[1, 2]], False)
    assert normalize_batch(None, ([1], (2, 3))) == (None, [[1], [2, 3]], True)
    assert normalize_batch(None, range(3)) == (None, [[0, 1, 2]], False)
    assert normalize_batch("hi", None) == (["hi"], None, False)
    assert normalize_batch(("a", "b"), None) == (["a", "b"], None, True)
