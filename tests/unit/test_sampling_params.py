"""``SamplingParams`` validation of integer fields: each must fit int64 (they end up in int64 arrays and tensors),
and a bad one raises ``InvalidRequestError`` naming it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sgl_ray.entrypoints.requests import to_sampling_params
from sgl_ray.errors import InvalidRequestError
from sgl_ray.sampling.params import SamplingParams

INT64_MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_k": 2**70}, "top_k"),
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 2**70}, "max_new_tokens"),
        ({"max_new_tokens": 2**63}, "max_new_tokens"),
        ({"min_new_tokens": 2**70}, "min_new_tokens"),
        ({"min_new_tokens": 1.5}, "min_new_tokens"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": 2**70}, "min_tokens"),
        ({"n": 2**70}, "n"),
        ({"n": 2.0}, "n"),
        ({"seed": 2**70}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop_token_ids": [2**70]}, "stop_token_ids"),
        ({"stop_token_ids": ["7"]}, "stop_token_ids"),
        ({"logit_bias": {2**70: 1.0}}, "logit_bias"),
    ],
)
def test_out_of_range_integers_name_their_field(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**fields).normalized()
    assert info.value.param == param
    assert str(info.value).startswith(f"{param}: ")


def test_huge_values_from_a_dict_are_rejected_too() -> None:
    """The Python ``Engine`` API builds its params from dicts: msgspec accepts integers of any size there."""
    with pytest.raises(InvalidRequestError) as info:
        to_sampling_params({"top_k": 2**70}).normalized()
    assert info.value.param == "top_k"
    with pytest.raises(InvalidRequestError) as info:
        to_sampling_params({"max_new_tokens": 2**70}).normalized().validate(32000)
    assert info.value.param == "max_new_tokens"


def test_int64_limits_and_top_k_beyond_the_vocabulary_are_valid() -> None:
    p = SamplingParams(top_k=INT64_MAX, max_new_tokens=INT64_MAX, min_new_tokens=INT64_MAX, seed=INT64_MAX)
    p.normalized().validate(vocab_size=32000)
    for top_k in (31999, 32000, 32001, 10**12):  # at or above the vocabulary: keep every token
        assert SamplingParams(top_k=top_k).normalized().top_k == top_k
        SamplingParams(top_k=top_k).normalized().validate(vocab_size=32000)
    assert SamplingParams(max_tokens=INT64_MAX).normalized().max_new_tokens == INT64_MAX
    assert SamplingParams(top_k=0).normalized().top_k == -1
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(top_k=-2).normalized()
    assert info.value.param == "top_k"


@pytest.mark.parametrize(
    "bias",
    [
        {"abc": 1.0},
        {"5.5": 1.0},
        {5.5: 1.0},  # not silently token 5
        {True: 1.0},
        {(1, 2): 1.0},
        {None: 1.0},
        {5: "x"},
        {5: math.nan},
        {5: math.inf},
        {5: -math.inf},
        {5: "nan"},
        {5: {"nested": 1.0}},
        {5: [1.0]},
        {5: None},
        {5: True},
        {5: 10**400},  # beyond any float
        {5: 100.5},
        {2**63: 1.0},
        [5, 1.0],
        "5",
    ],
)
def test_malformed_logit_bias_names_its_field(bias) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logit_bias=bias).normalized()
    assert info.value.param == "logit_bias"
    assert str(info.value).startswith("logit_bias: ")
    with pytest.raises(InvalidRequestError) as info:  # validate() takes params that were never normalized
        SamplingParams(logit_bias=bias).validate(32000)
    assert info.value.param == "logit_bias"


def test_logit_bias_takes_token_ids_as_integers_or_strings() -> None:
    bias = {"5": 1, 7: -100, " 9 ": 100.0, np.int64(11): np.float32(0.5), 12: "2.5"}
    p = SamplingParams(logit_bias=bias).normalized()
    assert p.logit_bias == {5: 1.0, 7: -100.0, 9: 100.0, 11: 0.5, 12: 2.5}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    p.validate(vocab_size=32000)
    assert to_sampling_params({"logit_bias": {"5": 2}}).normalized().logit_bias == {5: 2.0}
    with pytest.raises(InvalidRequestError) as info:
        p.validate(vocab_size=12)
    assert info.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError):  # from a dict, msgspec's type check comes first
        to_sampling_params({"logit_bias": {"abc": 1.0}})
