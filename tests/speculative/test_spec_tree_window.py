"""Tree drafts (``speculative_eagle_topk`` > 1) on a target with sliding-window layers: the tiny GPT-OSS of
tests/moe_models.py (a 6-token window on its first layer, full attention on its second, attention sinks on both)
with a perturbed copy as its STANDALONE draft model. Prompts run several windows long and trees of up to ten rows
hold nodes whose row index is far past their depth, so a node's window (reaching back from its position, prefix +
depth) cuts the prefix differently from its row's. Greedy outputs are token-identical to decoding without
speculation with the hybrid KV pools (the windowed layer's KV in its own slot space, where the accepted path's KV
is moved too) and with one shared pool, and both pools' accounting returns to its start. (The attention of tree rows
under a window, on the torch backend and the Triton kernel: tests/unit/test_tree_mask.py.)"""

from __future__ import annotations

import random

import pytest

import sgl_ray

from .conftest import perturbed_copy
from .test_spec_engine import assert_pool_restored

WINDOW = 6  # moe_models.moe_config("gpt_oss").sliding_window
GREEDY = {"temperature": 0.0, "max_new_tokens": 20, "ignore_eos": True}
COMMON = {"chunked_prefill_size": 8, "page_size": 4, "skip_tokenizer_init": True}
CASES = {  # topk, pool options
    "hybrid-pools": (3, {"max_total_tokens": 1024}),
    "hybrid-pools-short-of-swa": (3, {"max_total_tokens": 96, "swa_full_tokens_ratio": 0.25}),
    "chain-hybrid-pools-short-of-swa": (1, {"max_total_tokens": 96, "swa_full_tokens_ratio": 0.25}),
    "one-pool": (3, {"max_total_tokens": 1024, "disable_hybrid_swa_memory": True}),
}


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(1000, 40000) for _ in range(rng.randrange(2 * WINDOW, 6 * WINDOW))] for _ in range(n)
    ]


def _counts(outs: list[dict]) -> tuple[int, int, int]:
    metas = [o["meta_info"] for o in outs]
    return tuple(
        sum(m[k] for m in metas) for k in ("spec_verify_ct", "spec_proposed_drafts", "spec_accepted_drafts")
    )


@pytest.fixture(scope="module")
def gpt_oss_pair(moe_model, tmp_path_factory) -> tuple[str, str]:
    target = moe_model("gpt_oss")
    return target, perturbed_copy(target, tmp_path_factory.mktemp("gpt_oss_draft"), noise=0.05, seed=3)


@pytest.fixture(scope="module")
def prompts_and_plain(gpt_oss_pair) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts and their greedy outputs without speculation (one shared pool)."""
    prompts = _prompts(6, seed=2)
    with sgl_ray.Engine(
        gpt_oss_pair[0], max_total_tokens=2048, disable_hybrid_swa_memory=True, **COMMON
    ) as plain:
        return prompts, [o["output_ids"] for o in plain.generate(input_ids=prompts, sampling_params=GREEDY)]


@pytest.mark.parametrize("case", CASES)
def test_standalone_tree_on_windowed_target_greedy_identical(gpt_oss_pair, prompts_and_plain, case):
    """Trees of topk 3 (a chain for topk 1) over 6 concurrent requests in 8-token prefill chunks and 4-token pages:
    in roomy hybrid pools (then again, the prompts' KV coming from the prefix cache), in hybrid pools whose
    windowed pool (36 slots) is too small for every request's window at once, and in one shared pool."""
    target, draft = gpt_oss_pair
    prompts, want = prompts_and_plain
    topk, options = CASES[case]
    hybrid = not options.get("disable_hybrid_swa_memory", False)
    with sgl_ray.Engine(
        target,
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=draft,
        speculative_eagle_topk=topk,
        speculative_num_steps=3,
        **COMMON,
        **options,
    ) as engine:
        kv = engine._core.scheduler.kv
        assert (kv.slot_map is not None) == hybrid and (kv.window == WINDOW) == hybrid
        got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in got] == want
        verify_ct, proposed, accepted = _counts(got)
        assert verify_ct > 0 and 0 < accepted < proposed, (verify_ct, proposed, accepted)
        if options["max_total_tokens"] > 96:  # the same prompts again: their KV from the cache
            again = engine.generate(input_ids=prompts[:3], sampling_params=GREEDY)
            assert [o["output_ids"] for o in again] == want[:3]
            page = COMMON["page_size"]
            assert all(
                o["meta_info"]["cached_tokens"] >= len(p) - page
                for o, p in zip(again, prompts[:3], strict=True)
            )
        elif hybrid:
            assert kv.peak_swa_held == kv.swa_capacity < kv.capacity
        assert_pool_restored(engine)
        stats = engine.get_stats()
        assert stats["kv_swa_free"] == stats["kv_swa_capacity"] and (stats["kv_swa_capacity"] > 0) == hybrid


def test_tree_on_hybrid_pools_over_tensor_parallel_shards(ray_cluster, gpt_oss_pair, prompts_and_plain):
    """The same trees over two Ray shard actors (TP 2): each shard moves its windowed layers' KV in its own SWA
    slots, and the output is still decoding's without speculation."""
    prompts, want = prompts_and_plain
    target, draft = gpt_oss_pair
    spec = {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": draft}
    tree = {"speculative_eagle_topk": 3, "speculative_num_steps": 3, "speculative_num_draft_tokens": 8}
    with sgl_ray.Engine(target, tp_size=2, max_total_tokens=1024, **COMMON, **spec, **tree) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == want
        verify_ct, proposed, accepted = _counts(outs)
        assert verify_ct > 0 and 0 < accepted < proposed
        assert_pool_restored(engine)
        stats = engine.get_stats()
        assert stats["kv_swa_capacity"] > 0 and stats["kv_swa_free"] == stats["kv_swa_capacity"]
