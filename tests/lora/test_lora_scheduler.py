"""The scheduler's LoRA admission over a real runner: a batch never holds more distinct adapters than the runner
has slots, requests wait for a slot instead of failing, slot loads travel in the plans, and every request still
gets its adapter's greedy tokens."""

from __future__ import annotations

import torch

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.model_loader import iter_weights, load_hf_config, resolve_model
from sgl_ray.runner.model_runner import ModelRunner
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.request import Req
from sgl_ray.scheduler.scheduler import Scheduler, SchedulerConfig

from ..engine.prompts import PROMPTS

NEW = 5


def _runner_and_scheduler(path: str, adapters: dict[str, str], slots: int) -> tuple[ModelRunner, Scheduler]:
    source = resolve_model(path)
    args = EngineArgs(
        model_path=path,
        device="cpu",
        dtype="float32",
        max_total_tokens=1024,
        enable_lora=True,
        max_loras_per_batch=slots,
        max_lora_rank=16,
    )
    runner = ModelRunner(args, ModelConfig(load_hf_config(source), torch.float32, 256), iter_weights(source))
    info = runner.info
    sched = Scheduler(
        SchedulerConfig(
            num_slots=info.num_slots, max_reqs=info.max_reqs, context_length=256, max_loras_per_batch=slots
        )
    )
    for name, adapter in adapters.items():
        sched.lora.register(name, adapter)
    return runner, sched


def _req(rid: str, ids: list[int], name: str | None, new: int = NEW) -> Req:
    params = SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
    return Req(rid=rid, prompt_ids=ids, sampling=params, seed=0, lora_name=name, extra_key=name)


def test_a_request_waiting_for_a_slot_is_not_starved(tiny_llama_path, lora_adapters):
    """One slot, held by a0's requests while new a0 requests keep arriving: the a1 request that came first runs
    once a0's running requests drain, before the a0 requests that came after it (base requests are not held)."""
    runner, sched = _runner_and_scheduler(tiny_llama_path, lora_adapters, slots=1)
    ids = list(range(100, 110))
    sched.add_request(_req("first-a0", ids, "a0", new=4))
    sched.add_request(_req("a1", ids, "a1", new=2))
    started: dict[str, int] = {}
    for step in range(60):
        if step < 12:  # a steady stream for the adapter that holds the slot, and base-model requests
            sched.add_request(_req(f"a0-{step}", ids, "a0", new=4))
            sched.add_request(_req(f"base-{step}", ids, None, new=1))
        if not sched.has_work:
            break

        def execute(plan, step=step):
            for r in sched.running:
                started.setdefault(r.rid, step)
            return runner.execute(plan)

        sched.step(execute)
    assert not sched.has_work
    later_a0 = [started[f"a0-{s}"] for s in range(12)]
    assert started["a1"] < min(later_a0)  # it ran before every a0 request submitted after it
    assert started["base-0"] <= 1  # base-model requests were never held back


def test_admission_respects_slots_and_loads_travel_in_plans(tiny_llama_path, lora_adapters, peft_reference):
    runner, sched = _runner_and_scheduler(tiny_llama_path, lora_adapters, slots=2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    names = ["a0", "a1", "a2", None, "a3", "a0"]
    reqs = [
        Req(
            rid=str(i),
            prompt_ids=tok.encode(PROMPTS[i]),
            sampling=SamplingParams(temperature=0.0, max_new_tokens=NEW, ignore_eos=True),
            seed=0,
            lora_name=name,
            extra_key=name,
        )
        for i, name in enumerate(names)
    ]
    for r in reqs:
        sched.add_request(r)
    plans, tokens = [], {r.rid: [] for r in reqs}
    for _ in range(100):
        if not sched.has_work:
            break

        def execute(plan):
            plans.append(plan)
            return runner.execute(plan)

        for out in sched.step(execute):
            tokens[out.rid] += out.token_ids
    assert not sched.has_work
    for plan in plans:
        used = {int(s) for s in plan.lora_slots if s >= 0}
        assert len(used) <= 2 and used <= {0, 1}
    loads = [(load.slot, load.name) for p in plans for load in p.lora_loads]
    assert len(loads) >= 4 and {n for _, n in loads} == {"a0", "a1", "a2", "a3"}  # evicted and reloaded
    assert plans[0].lora_slots.tolist()[:2] == [0, 1]  # a2 waited: both slots were running
    for r, name in zip(reqs, names, strict=True):
        assert tokens[r.rid] == peft_reference(name, r.prompt_ids, NEW), (r.rid, name)
