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


def test_admission_respects_slots_and_loads_travel_in_plans(tiny_llama_path, lora_adapters, peft_reference):
    source = resolve_model(tiny_llama_path)
    args = EngineArgs(
        model_path=tiny_llama_path,
        device="cpu",
        dtype="float32",
        max_total_tokens=1024,
        enable_lora=True,
        max_loras_per_batch=2,
        max_lora_rank=16,
    )
    runner = ModelRunner(args, ModelConfig(load_hf_config(source), torch.float32, 256), iter_weights(source))
    info = runner.info
    sched = Scheduler(
        SchedulerConfig(
            num_slots=info.num_slots, max_reqs=info.max_reqs, context_length=256, max_loras_per_batch=2
        )
    )
    for name, path in lora_adapters.items():
        sched.lora.register(name, path)
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
