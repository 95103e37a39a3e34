"""Batched admission into the sampling state: ``set_requests`` leaves exactly the state that one ``set_request``
per request leaves, and a bad request in a batch writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgl_ray.errors import InvalidRequestError
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.sampling.state import Admission, SamplingState

V = 50
FIELDS = (
    "temperature top_p top_k min_p frequency_penalty presence_penalty repetition_penalty seed seed_key greedy "
    "min_new_tokens num_generated stop_ids stop_valid bias_ids bias_vals output_counts prompt_mask"
).split()


def _admissions() -> list[Admission]:
    return [
        Admission(3, SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05), 11, [2], [1, 4]),
        Admission(0, SamplingParams(temperature=0.0), 12, [2], [7]),
        Admission(5, SamplingParams(temperature=1.0, top_k=1), 13, [2], [3]),  # top-k 1: greedy
        Admission(
            1,
            SamplingParams(
                min_new_tokens=4,
                stop_token_ids=[9, 8, 7, 6, 5],
                logit_bias={3: 2.0, 4: -1.5},
                repetition_penalty=1.3,
            ),
            2**62 + 5,
            [2],
            [1, 1, 3],
            [4, 4, 6],  # resumed: tokens already generated count
        ),
        Admission(
            6,
            SamplingParams(frequency_penalty=0.4, presence_penalty=0.2, ignore_eos=True, min_new_tokens=2),
            1,
            [2],
            [0],
        ),
    ]


def _state(st: SamplingState) -> dict[str, torch.Tensor]:
    return {f: getattr(st, f).clone() for f in FIELDS if getattr(st, f) is not None}


def test_batched_admission_equals_one_by_one():
    one, many = SamplingState(8, V), SamplingState(8, V)
    for a in _admissions():
        one.set_request(*a)
    many.set_requests(_admissions())
    a, b = _state(one), _state(many)
    for f in FIELDS:
        torch.testing.assert_close(b[f], a[f], msg=f)
    for name in one._flags:
        np.testing.assert_array_equal(many._flags[name], one._flags[name], err_msg=name)
    np.testing.assert_array_equal(many._top_k, one._top_k)
    assert int(many.num_generated[1]) == 3 and int(many.output_counts[1, 4]) == 2
    assert bool(many.greedy[5]) and float(many.temperature[5]) == 0.0
    assert many.stop_ids.shape[1] >= 6 and bool(many.stop_valid[1, :6].all())  # 5 stops + EOS: widened

    slots = [a.slot for a in _admissions()]
    many.clear_requests(slots)
    fresh = SamplingState(8, V)
    for f in FIELDS[:12]:  # counts rows may stay stale by design
        torch.testing.assert_close(getattr(many, f)[slots], getattr(fresh, f)[slots], msg=f)
    assert not any(many._flags[name][slots].any() for name in many._flags)


def test_a_bad_request_in_a_batch_writes_nothing():
    st = SamplingState(8, V)
    before = _state(st)
    bad = Admission(4, SamplingParams(logit_bias={V + 3: 1.0}), 0, [2], [1])
    with pytest.raises(InvalidRequestError):
        st.set_requests([*_admissions()[:2], bad])
    for f, t in _state(st).items():
        torch.testing.assert_close(t, before[f], msg=f)
