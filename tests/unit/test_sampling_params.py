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


HUGE = 10**5000  # past Python's int-to-str limit (4300 digits): str() or repr() of it raises ValueError

_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k", "n", "seed", "max_tokens", "min_tokens")
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


@pytest.mark.parametrize("value", [HUGE, -HUGE], ids=["huge", "-huge"])  # pytest cannot str() them
@pytest.mark.parametrize("param", _INT_FIELDS + _FLOAT_FIELDS)
def test_an_integer_too_long_to_print_still_gets_its_error(param: str, value: int) -> None:
    """Building the message must not fail: the value is shown by its size."""
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{param: value}).normalized()
    assert info.value.param == param
    assert str(info.value) == info.value.message
    assert "integer of 16610 bits" in info.value.message


def test_integers_too_long_to_print_from_a_dict_and_in_lists() -> None:
    cases = [
        ({"max_new_tokens": HUGE}, "max_new_tokens"),
        ({"max_tokens": -HUGE}, "max_tokens"),
        (
            {"max_tokens": 5, "max_new_tokens": HUGE},
            "max_tokens",
        ),  # both set: the conflict message shows both
        ({"stop_token_ids": [HUGE]}, "stop_token_ids"),
        ({"json_schema": {"type": "string", "maxLength": HUGE}}, "json_schema"),
        ({"structural_tag": {"begin": HUGE}}, "structural_tag"),
    ]
    for fields, param in cases:
        with pytest.raises(InvalidRequestError) as info:
            to_sampling_params(fields).normalized().validate(32000)
        assert info.value.param == param


@pytest.mark.parametrize("value", ["0.5", None, [0.5], np.array([0.5, 0.7])])
@pytest.mark.parametrize("param", _FLOAT_FIELDS)
def test_a_number_field_that_is_no_number_names_itself(param: str, value) -> None:
    """``SamplingParams`` built in Python are not type-checked: a comparison must not raise ``TypeError``."""
    for check in (lambda p: p.normalized(), lambda p: p.validate(32000)):
        with pytest.raises(InvalidRequestError) as info:
            check(SamplingParams(**{param: value}))
        assert info.value.param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop": 5}, "stop"),
        ({"stop": np.array(["a", "b"])}, "stop"),
        ({"stop_regex": 5}, "stop_regex"),
        ({"stop_regex": {"a": 1}}, "stop_regex"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop_token_ids": np.array([1, 2])}, "stop_token_ids"),
    ],
)
def test_a_field_of_the_wrong_shape_names_itself(fields: dict, param: str) -> None:
    for check in (lambda p: p.normalized(), lambda p: p.validate(32000)):
        with pytest.raises(InvalidRequestError) as info:
            check(SamplingParams(**fields))
        assert info.value.param == param


def test_a_grammar_object_with_no_json_form_names_itself() -> None:
    cycle: dict = {"type": "object"}
    cycle["self"] = cycle
    for param, value in (
        ("json_schema", {"type": object()}),
        ("json_schema", cycle),
        ("structural_tag", cycle),
    ):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**{param: value}).normalized()
        assert info.value.param == param


def test_accepted_shapes_and_numbers_still_normalize() -> None:
    p = SamplingParams(
        stop=("a", "b"),
        stop_regex=["x+"],
        stop_token_ids=(3, 4),
        temperature=np.float32(0.5),
        top_p=1,
        repetition_penalty=np.float64(1.5),
        json_schema={"type": "object"},
    ).normalized()
    p.validate(32000)
    assert (p.stop, p.stop_regex, p.json_schema) == (["a", "b"], ["x+"], '{"type": "object"}')
    assert SamplingParams(stop={"a"}, stop_token_ids={7}).normalized().stop == ["a"]


def test_shown_value_keeps_small_values_and_sizes_huge_integers() -> None:
    from sgl_ray.sampling.params import shown_value

    assert shown_value(2**128 - 1) == str(2**128 - 1)
    assert shown_value(2**128) == "an integer of 129 bits"
    assert shown_value(-HUGE) == "a negative integer of 16610 bits"
    assert shown_value([HUGE]) == "<list too long to show>"
    assert shown_value("abc") == "'abc'"
    assert shown_value(True) == "True"


@pytest.mark.parametrize("field", [*_INT_FIELDS, *_FLOAT_FIELDS])
def test_bools_are_not_numbers(field):
    """``True`` is 1 to Python, but no count, seed or probability: a typed error naming the field (the HTTP routes
    refuse it while decoding JSON; this is the Python API)."""
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: True}).normalized()
    assert e.value.param == field


def test_bool_stop_token_ids_are_refused():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(stop_token_ids=[2, True]).validate()
    assert e.value.param == "stop_token_ids"
