"""Waiting-queue orderings (FCFS, priority, LPM, DFS-weight) over a real KVCacheManager and prefix cache, and the
order in which a real Scheduler + ModelRunner (tiny random-weight Qwen2, CPU) then admits requests."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.mem_cache.base import CacheKey
from sgl_ray.model_loader import iter_weights, load_hf_config, resolve_model
from sgl_ray.runner.model_runner import ModelRunner
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.kv_manager import KVCacheManager
from sgl_ray.scheduler.plan import StepOutput, StepPlan
from sgl_ray.scheduler.policy import (
    DFSWeightPolicy,
    FCFSPolicy,
    LPMPolicy,
    PriorityPolicy,
    create_policy,
)
from sgl_ray.scheduler.request import Req
from sgl_ray.scheduler.scheduler import Scheduler, SchedulerConfig

P = list(range(100, 106))  # two cached prefix families
Q = list(range(200, 206))


def make_req(rid: str, ids: list[int], new: int = 1, **kw: Any) -> Req:
    p = SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True).normalized()
    return Req(rid=rid, prompt_ids=list(ids), sampling=p, seed=0, **kw)


def make_kv(*cached: list[int], enable: bool = True) -> KVCacheManager:
    """A KV manager whose prefix cache holds ``cached`` (slots taken from its own allocator)."""
    kv = KVCacheManager(num_slots=1025, page_size=1, max_reqs=8, enable_prefix_cache=enable)
    for tokens in cached:
        slots = kv.allocator.alloc_extend(
            np.zeros(1, np.int64), np.full(1, -1, np.int64), np.array([len(tokens)])
        )
        kv.cache.insert(CacheKey(tokens), slots)
    return kv


def rids(reqs: list[Req]) -> list[str]:
    return [r.rid for r in reqs]


def interleaved_families(n_p: int, n_q: int) -> list[Req]:
    """P- and Q-family requests alternating in arrival order (P first), each with its own suffix."""
    fam_p = [make_req(f"p{i}", P + [1000 + i, 7]) for i in range(n_p)]
    fam_q = [make_req(f"q{i}", Q + [2000 + i, 7]) for i in range(n_q)]
    out = []
    for i in range(max(n_p, n_q)):
        out += fam_p[i : i + 1] + fam_q[i : i + 1]
    return out


# --- pure orderings -----------------------------------------------------------------------------------------


def test_create_policy_by_name() -> None:
    assert isinstance(create_policy("fcfs"), FCFSPolicy)
    assert isinstance(create_policy("lpm"), LPMPolicy)
    assert isinstance(create_policy("dfs-weight"), DFSWeightPolicy)
    assert isinstance(create_policy("priority"), PriorityPolicy)


def test_fcfs_keeps_arrival_order() -> None:
    kv = make_kv(P)
    waiting = [make_req("x", [9, 9, 9]), make_req("p", P + [1]), make_req("y", [8, 8])]
    order = FCFSPolicy().order(waiting, kv)
    assert rids(order) == ["x", "p", "y"]
    assert order is not waiting  # a new list


def test_priority_orders_by_priority_then_arrival() -> None:
    spec = [("a", 0, 1.0), ("b", 2, 5.0), ("c", 1, 2.0), ("d", 2, 3.0), ("e", 0, 0.5)]
    waiting = [make_req(rid, [5, 6], priority=prio, arrival=t) for rid, prio, t in spec]
    assert rids(PriorityPolicy().order(waiting, make_kv())) == ["d", "b", "c", "e", "a"]


def test_lpm_orders_by_longest_cached_prefix_stably() -> None:
    kv = make_kv(P, Q[:3])
    waiting = [
        make_req("none", [300, 301, 302, 303]),
        make_req("q3", Q[:3] + [50, 51]),
        make_req("p6", P + [50, 51]),
        make_req("p4", P[:4] + [60, 61]),  # splits P's node
        make_req("q3b", Q[:3] + [70, 71]),
        make_req("short", P[:2]),  # at least one token is left to compute: matches only 1
    ]
    order = LPMPolicy().order(waiting, kv)
    assert rids(order) == ["p6", "p4", "q3", "q3b", "short", "none"]
    assert [r.prefix_len_hint for r in waiting] == [0, 3, 6, 4, 3, 1]


def test_dfs_weight_groups_families_heavier_first() -> None:
    kv = make_kv(P, Q)
    waiting = interleaved_families(2, 3)
    assert rids(waiting) == ["p0", "q0", "p1", "q1", "q2"]
    assert rids(DFSWeightPolicy().order(waiting, kv)) == ["q0", "q1", "q2", "p0", "p1"]
    # With the weights reversed, P goes first.
    waiting = interleaved_families(3, 2)
    assert rids(DFSWeightPolicy().order(waiting, kv)) == ["p0", "p1", "p2", "q0", "q1"]


def test_dfs_weight_visits_a_heavier_subtree_before_a_heavier_node() -> None:
    # Q's subtree holds three requests spread over two nodes (Q and Q+[210, 211]); P's node holds two.
    kv = make_kv(P, Q, Q + [210, 211])
    waiting = [
        make_req("p0", P + [1, 7]),
        make_req("q0", Q + [2, 7]),
        make_req("p1", P + [3, 7]),
        make_req("qq0", Q + [210, 211, 4, 7]),
        make_req("qq1", Q + [210, 211, 5, 7]),
    ]
    order = rids(DFSWeightPolicy().order(waiting, kv))
    assert order[:3] in (["q0", "qq0", "qq1"], ["qq0", "qq1", "q0"])
    assert order[3:] == ["p0", "p1"]


def test_dfs_weight_puts_requests_without_a_cached_prefix_last() -> None:
    kv = make_kv(P, Q)
    waiting = [
        make_req("p0", P + [1, 7]),
        make_req("u0", [900, 901, 902]),  # nothing cached: matched at the root
        make_req("q0", Q + [2, 7]),
        make_req("q1", Q + [3, 7]),
    ]
    assert rids(DFSWeightPolicy().order(waiting, kv)) == ["q0", "q1", "p0", "u0"]


@pytest.mark.parametrize("policy", [LPMPolicy(), DFSWeightPolicy()], ids=["lpm", "dfs-weight"])
def test_prefix_policies_fall_back_to_fcfs_above_128_waiting(policy) -> None:
    kv = make_kv(P, Q, Q + [210, 211])
    deep = make_req("deep", Q + [210, 211, 9, 7])  # the longest match (8), arriving last
    at_limit = interleaved_families(63, 64) + [deep]
    assert len(at_limit) == 128
    order = rids(policy.order(at_limit, kv))
    if isinstance(policy, LPMPolicy):
        assert order == ["deep"] + rids(at_limit[:-1])
    else:  # Q's subtree (65 requests) before P's (63); within it the deeper match first (post-order)
        assert order == ["deep"] + [f"q{i}" for i in range(64)] + [f"p{i}" for i in range(63)]

    over = interleaved_families(63, 65) + [deep]  # 129 requests: no matching at all
    for r in over:
        r.prefix_len_hint = -1
    assert rids(policy.order(over, kv)) == rids(over)
    assert all(r.prefix_len_hint == -1 for r in over)


@pytest.mark.parametrize("policy", [LPMPolicy(), DFSWeightPolicy()], ids=["lpm", "dfs-weight"])
def test_prefix_policies_are_fcfs_without_a_cache(policy) -> None:
    kv = make_kv(enable=False)
    waiting = interleaved_families(2, 3)
    assert rids(policy.order(waiting, kv)) == rids(waiting)


# --- through the scheduler ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(tiny_qwen2_path: str) -> ModelRunner:
    source = resolve_model(tiny_qwen2_path)
    args = EngineArgs(
        model_path=tiny_qwen2_path,
        device="cpu",
        dtype="float32",
        max_total_tokens=256,
        max_running_requests=4,
    )
    return ModelRunner(args, ModelConfig(load_hf_config(source), torch.float32, 64), iter_weights(source))


def admission_order(runner: ModelRunner, policy: str, warm: list[Req], reqs: list[Req]) -> list[list[str]]:
    """Run ``warm`` to completion, then ``reqs`` one at a time; the batch rows of the second phase's plans."""
    sched = Scheduler(
        SchedulerConfig(num_slots=257, max_reqs=4, context_length=64, max_running_requests=1, policy=policy)
    )
    rows: list[list[str]] = []
    plans: list[StepPlan] = []

    def execute(plan: StepPlan) -> StepOutput:
        owners = {r.req_pool_idx: r.rid for r in sched.running}
        rows.append([owners[int(i)] for i in plan.req_pool_idxs])
        plans.append(plan)
        return runner.execute(plan)

    for phase in (warm, reqs):
        rows.clear()
        plans.clear()
        for r in phase:
            sched.add_request(r)
        while sched.has_work:
            sched.step(execute)
    assert sched.kv.cache is None or sched.kv.cache.protected_size == 0
    return rows


def test_scheduler_admits_by_lpm_with_a_prefix_cached_by_a_real_request(runner) -> None:
    shared = list(range(300, 312))

    def reqs() -> tuple[list[Req], list[Req]]:
        warm = [make_req("warm", shared)]
        return warm, [make_req("x", list(range(500, 510))), make_req("y", shared + [40, 41, 42])]

    assert admission_order(runner, "fcfs", *reqs()) == [["x"], ["y"]]
    assert admission_order(runner, "lpm", *reqs()) == [["y"], ["x"]]


def test_scheduler_admits_higher_priority_first(runner) -> None:
    low = make_req("low", list(range(500, 505)), priority=0)
    high = make_req("high", list(range(600, 605)), priority=5)
    assert admission_order(runner, "priority", [], [low, high]) == [["high"], ["low"]]
