"""MoE families over Ray shard actors (gloo, CPU): expert parallelism (``ep_size == tp_size``: attention split by
heads, experts split between the actors) and tensor-parallel experts (``ep_size=1``: every expert's intermediate
dimension split) give transformers' greedy tokens, with concurrency, 16-token prefill chunks and prefix hits; the
expert-load statistics come back from the shards."""

from __future__ import annotations

import contextlib

import pytest
import ray
from transformers import MixtralConfig

import sgl_ray
from sgl_ray.errors import InvalidRequestError

from ..conftest import save_tiny_model
from ..engine.test_moe_greedy import check_exact, check_expert_load, computed_tokens, token_lists
from ..moe_models import moe_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GREEDY_STREAM = {"temperature": 0.0, "ignore_eos": True}


@pytest.mark.parametrize(
    ("name", "tp", "ep", "a2a"),
    [
        ("qwen3_moe", 2, 2, "none"),  # per-head q/k norms, a dense layer between sparse ones
        ("qwen2_moe", 2, 1, "none"),  # shared experts (tensor-parallel) summed before the one all-reduce
        ("qwen2_moe", 2, 2, "all_to_all"),  # token slices to their experts and back; shared experts whole
        ("olmoe", 2, 2, "none"),  # whole-projection q/k norms gathered across the ranks
        # sinks split by head; each expert's intermediate split over both ranks, the down bias added once (the
        # fused checkpoint layout's slices at tp 2 / ep 1 and 2: tests/unit/test_moe_layer.py)
        ("gpt_oss", 2, 1, "none"),
    ],
)
def test_moe_parallel_greedy_matches_transformers(
    name, tp, ep, a2a, ray_cluster, moe_model, moe_reference, request
):
    with contextlib.ExitStack() as stack:
        if (name, tp, ep, a2a) == QWEN3_MOE_EP:  # its engine is the dead-shard test's too
            engine = request.getfixturevalue("qwen3_moe_ep_engine")
            assert engine.flush_cache()
        else:
            engine = stack.enter_context(_engine(moe_model(name), tp, ep, a2a))
        before = engine.get_stats().get("expert_tokens", {})
        lists = token_lists(engine.tokenizer)
        ref = moe_reference(name)
        first = check_exact(engine, ref, lists)
        again = check_exact(engine, ref, lists[-2:])
        assert all(o["meta_info"]["cached_tokens"] >= len(lists[-1]) // 2 for o in again)
        stats = engine.get_stats()
        stats["expert_tokens"] = {  # this test's tokens (none before on an engine of its own)
            layer: [c - b for c, b in zip(counts, before.get(layer, [0] * len(counts)), strict=True)]
            for layer, counts in stats["expert_tokens"].items()
        }
        check_expert_load(stats, name, computed_tokens(first + again))


def _engine(path: str, tp: int, ep: int, a2a: str) -> sgl_ray.Engine:
    return sgl_ray.Engine(
        path, tp_size=tp, ep_size=ep, moe_a2a_backend=a2a, chunked_prefill_size=16, max_total_tokens=4096
    )


QWEN3_MOE_EP = ("qwen3_moe", 2, 2, "none")


@pytest.fixture(scope="module")
def qwen3_moe_ep_engine(ray_cluster, moe_model):
    """Qwen3-MoE with expert parallelism over two shard actors, started once for the greedy and dead-shard
    tests (each flushes the prefix cache first)."""
    with _engine(moe_model("qwen3_moe"), *QWEN3_MOE_EP[1:]) as engine:
        yield engine


def test_ep_size_must_divide_the_experts(ray_cluster, tmp_path):
    """A Mixtral with 6 experts over 4 expert-parallel ranks: a typed error before any actor starts."""
    path = save_tiny_model(
        MixtralConfig(**{**moe_config("mixtral").to_dict(), "num_local_experts": 6}), tmp_path, None
    )
    with pytest.raises(InvalidRequestError, match="does not divide the model's 6 experts") as err:
        sgl_ray.Engine(path, tp_size=4, ep_size=4, skip_tokenizer_init=True)
    assert err.value.param == "ep_size"
    with pytest.raises(InvalidRequestError, match="must divide tp_size"):
        sgl_ray.Engine(path, tp_size=2, ep_size=4, skip_tokenizer_init=True)


def test_dead_expert_parallel_shard_is_rebuilt(qwen3_moe_ep_engine, moe_reference):
    """The shard holding experts 4-7 dies mid-stream: the group is rebuilt (the new actor loads the same experts)
    and the request resumes from its tokens, greedy-identical to transformers."""
    new = 24
    engine = qwen3_moe_ep_engine
    assert engine.flush_cache()  # the prompt starts cold, as on a new engine
    rebuilds = engine.get_stats()["num_rebuilds"]
    prompt = engine.tokenizer.encode("The quick brown fox jumps over")
    ids = []
    params = {**GREEDY_STREAM, "max_new_tokens": new}
    for i, chunk in enumerate(engine.generate(input_ids=prompt, sampling_params=params, stream=True)):
        ids += chunk["output_ids"]
        if i == 4:
            scheduler = engine._core.scheduler_actor()
            ray.kill(ray.get(scheduler.shard_handles.remote())[1], no_restart=True)
    assert ids == moe_reference("qwen3_moe")(prompt, new)
    assert engine.get_stats()["num_rebuilds"] == rebuilds + 1
