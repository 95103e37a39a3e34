"""A dead shard actor or a dead scheduler actor does not lose requests: the group is rebuilt and generation
resumes from the tokens already produced (greedy output identical to an undisturbed run), and the engine keeps
serving afterwards."""

from __future__ import annotations

import time

import pytest
import ray

import sgl_ray

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = "The quick brown fox jumps over"
GREEDY = {"temperature": 0.0, "max_new_tokens": 32, "ignore_eos": True}
BOUND_S = 120  # a rebuild (new actors, weights loaded again) must finish well within this


@pytest.fixture(scope="module")
def expected(tiny_qwen2_path):
    with sgl_ray.Engine(tiny_qwen2_path, max_total_tokens=2048) as ref:
        return ref.generate(PROMPT, GREEDY)


def _stream_with_kill(engine, kill) -> tuple[list[int], str]:
    ids, text = [], ""
    for i, chunk in enumerate(engine.generate(PROMPT, GREEDY, stream=True)):
        ids += chunk["output_ids"]
        text += chunk["text"]
        if i == 4:
            kill()
    return ids, text


def test_request_survives_actor_death(ray_cluster, tiny_qwen2_path, expected):
    """A shard actor dies mid-stream (the group is rebuilt), then, on the same engine, the scheduler actor does (it
    is restarted with a new group)."""
    with sgl_ray.Engine(tiny_qwen2_path, tp_size=2, max_total_tokens=2048) as engine:
        for victim, key in (("shard", "num_rebuilds"), ("scheduler", "num_scheduler_restarts")):

            def kill(victim=victim):
                scheduler = engine._core.scheduler_actor()
                if victim == "shard":
                    ray.kill(ray.get(scheduler.shard_handles.remote())[1], no_restart=True)
                else:
                    ray.kill(scheduler, no_restart=True)

            t0 = time.monotonic()
            ids, text = _stream_with_kill(engine, kill)
            assert time.monotonic() - t0 < BOUND_S, victim
            assert ids == expected["output_ids"], victim
            assert text == expected["text"], victim
            assert engine.get_stats()[key] == 1, victim
            # Still serving, with nothing left running.
            assert engine.generate(PROMPT, GREEDY)["output_ids"] == expected["output_ids"], victim
            stats = engine.get_stats()
            assert stats["num_running"] == 0 and stats["num_waiting"] == 0, victim
