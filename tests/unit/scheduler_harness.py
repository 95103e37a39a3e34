"""Shared by the scheduler tests: a Harness that drives the real Scheduler over a real ModelRunner (tiny
random-weight Qwen2, fp32, CPU) and records every plan, batch row and output."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sgl_ray.runner.model_runner import ModelRunner
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.scheduler.plan import StepOutput, StepPlan
from sgl_ray.scheduler.request import Req
from sgl_ray.scheduler.scheduler import Scheduler, SchedulerConfig

CONTEXT = 256  # the runner's request table width; every scheduler here uses at most this
POOL = 1024  # runner KV slots (plus the reserved one); schedulers use at most this many
MAX_REQS = 16
EOS = 2


class Harness:
    """A fresh Scheduler over the shared runner that records every plan it executes, the rid of each batch row,
    and every output."""

    def __init__(self, model: tuple[ModelRunner, Any], **config: Any) -> None:
        self.runner, tokenizer = model
        config = {"num_slots": POOL + 1, "max_reqs": MAX_REQS, "context_length": CONTEXT, **config}
        self.sched = Scheduler(SchedulerConfig(**config), tokenizer)
        self.plans: list[StepPlan] = []
        self.rows: list[list[str]] = []  # rid of each batch row, per plan
        self.owners: list[dict[int, str]] = []  # req_pool_idx -> rid of every running request, per plan
        self.step_outputs: list[list[RequestOutput]] = []
        self.outputs: dict[str, list[RequestOutput]] = defaultdict(list)

    def execute(self, plan: StepPlan) -> StepOutput:
        owners = {r.req_pool_idx: r.rid for r in self.sched.running}
        self.plans.append(plan)
        self.owners.append(owners)
        self.rows.append([owners[int(i)] for i in plan.req_pool_idxs])
        return self.runner.execute(plan)

    def add(self, *reqs: Req) -> None:
        for r in reqs:
            self.sched.add_request(r)

    def step(self, execute: Any = None) -> list[RequestOutput]:
        outs = self.sched.step(execute or self.execute)
        self.step_outputs.append(outs)
        for o in outs:
            self.outputs[o.rid].append(o)
        return outs

    def run(self, max_steps: int = 100) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work:
                return
            self.step()
        raise AssertionError(
            f"still working after {max_steps} steps: waiting={[r.rid for r in self.sched.waiting]}"
        )

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def finish(self, rid: str) -> dict | None:
        finished = [o for o in self.outputs[rid] if o.finished]
        assert len(finished) == 1, f"{rid}: {len(finished)} finished outputs"
        return finished[0].finish_reason

    def col(self, name: str) -> list[list]:
        return [getattr(p, name).tolist() for p in self.plans]

    def assert_no_leaks(self) -> None:
        kv = self.sched.kv
        cached = kv.cache.total_size if kv.cache is not None else 0
        assert kv.allocator.num_free_slots + cached == kv.capacity
        if kv.cache is not None:
            assert kv.cache.protected_size == 0
        assert kv.num_free_req_slots == kv.max_reqs
        assert not self.sched.running and not self.sched.waiting


def prompt(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def make_req(rid: str, ids: list[int], new: int = 4, *, params: dict | None = None, **kw: Any) -> Req:
    p = SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True, **(params or {})).normalized()
    return Req(rid=rid, prompt_ids=list(ids), sampling=p, seed=0, eos_token_ids=(EOS,), **kw)


def run_alone(model, ids: list[int], new: int) -> list[int]:
    h = Harness(model)
    h.add(make_req("solo", ids, new))
    h.run()
    return h.tokens("solo")


def rng(a: int, b: int) -> list[int]:
    return list(range(a, b))
