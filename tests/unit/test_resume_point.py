"""The replica's side of resuming a request (``deployments/resume.py``) on an in-process engine: continued from
the tokens a client already has, a greedy request yields exactly the rest of an uninterrupted run — tokens, text
(with a stop string held back across the cut), counts and request id."""

from __future__ import annotations

import asyncio
import math

import pytest

from sgl_ray.deployments import build_openai_app
from sgl_ray.deployments.resume import ResumePoint, ResumePolicy, astream_resumed, lost_replica
from sgl_ray.entrypoints.engine import Engine
from sgl_ray.errors import EngineDeadError, InvalidRequestError
from sgl_ray.sampling.params import SamplingParams

PROMPT = [1, 1500, 2500, 3500, 4500]
LENGTH = 40


@pytest.fixture(scope="module")
def engine(tiny_llama_path):
    with Engine(model_path=tiny_llama_path, device="cpu", max_total_tokens=2048) as engine:
        yield engine


def _collect(stream) -> list:
    async def run() -> list:
        return [out async for _, out in stream]

    return asyncio.run(run())


def _uninterrupted(engine: Engine, params: SamplingParams) -> list:
    return _collect(engine.astream_outputs(PROMPT, params, return_logprob=True))


def _resume_after(engine: Engine, params: SamplingParams, outs: list, cut: int) -> tuple[str, list]:
    """The text a client had after the first ``cut`` outputs, and the outputs of the request resumed there."""
    tokens = [t for out in outs[:cut] for t in out.token_ids]
    last = outs[cut - 1]
    point = ResumePoint(0, last.rid, tokens, decode_steps=last.decode_steps)
    stream = astream_resumed(engine, PROMPT, params, point, return_logprob=True)
    return "".join(out.text for out in outs[:cut]), _collect(stream)


def test_greedy_resume_continues_the_uninterrupted_run(engine, hf_reference):
    params = SamplingParams(max_new_tokens=LENGTH, temperature=0.0, ignore_eos=True)
    outs = _uninterrupted(engine, params)
    tokens = [t for out in outs for t in out.token_ids]
    assert tokens == hf_reference("llama")(PROMPT, LENGTH)
    for cut in (1, 17, len(outs) - 1):
        before = sum(len(out.token_ids) for out in outs[:cut])
        text, resumed = _resume_after(engine, params, outs, cut)
        assert [t for out in resumed for t in out.token_ids] == tokens[before:]
        assert text + "".join(out.text for out in resumed) == "".join(out.text for out in outs)
        assert {out.rid for out in resumed} == {outs[0].rid}
        end = resumed[-1]
        assert end.finished and end.finish_reason == outs[-1].finish_reason
        assert end.completion_tokens == LENGTH and end.decode_steps == outs[-1].decode_steps
        assert len([lp for out in resumed for lp in out.output_logprobs]) == LENGTH - before


def test_a_stop_string_across_the_cut_still_stops_and_is_not_sent_twice(engine):
    free = _uninterrupted(engine, SamplingParams(max_new_tokens=LENGTH, temperature=0.0, ignore_eos=True))
    text = "".join(out.text for out in free)
    stop = text[len(text) // 2 : len(text) // 2 + 6]  # some text in the middle, spanning several tokens
    params = SamplingParams(max_new_tokens=LENGTH, temperature=0.0, ignore_eos=True, stop=[stop])
    outs = _uninterrupted(engine, params)
    expected = "".join(out.text for out in outs)
    assert outs[-1].finish_reason["matched"] == stop and stop not in expected
    cut = len(outs) - 1  # the stop string's first tokens are in, its text held back
    sent, resumed = _resume_after(engine, params, outs, cut)
    assert sent + "".join(out.text for out in resumed) == expected
    assert resumed[-1].finish_reason == outs[-1].finish_reason


def test_the_policy_and_which_errors_mean_a_lost_replica(tiny_llama_path):
    from ray import ActorID
    from ray.exceptions import ActorUnavailableError

    assert ResumePolicy.from_config({}) == ResumePolicy(timeout_s=60.0, max_resumes=3)
    config = {"request_resume_timeout_s": 5, "max_request_resumes": 0}
    assert ResumePolicy.from_config(config) == ResumePolicy(timeout_s=5.0, max_resumes=0)
    bad = (
        {"request_resume_timeout_s": 0},
        {"request_resume_timeout_s": "5"},
        {"request_resume_timeout_s": math.inf},
        {"max_request_resumes": -1},
        {"max_request_resumes": 1.5},
        {"max_request_resumes": True},
    )
    for config in bad:
        (param,) = config
        with pytest.raises(InvalidRequestError) as e:
            ResumePolicy.from_config(config)
        assert e.value.param == param
    with pytest.raises(InvalidRequestError, match="max_request_resumes"):  # checked before any replica starts
        build_openai_app({"model_path": tiny_llama_path, "max_request_resumes": -1})
    actor = ActorID.from_random()
    # the same replica gives the same key (a retry routed to it again is not a second loss)
    assert lost_replica(ActorUnavailableError("gone", actor.binary())) == actor.hex()
    assert lost_replica(EngineDeadError("the engine died")) != lost_replica(
        EngineDeadError("the engine died")
    )
    assert lost_replica(InvalidRequestError("bad request")) is None
    assert lost_replica(ValueError("a bug")) is None
