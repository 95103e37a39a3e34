"""The engine-core seam: what the ``Engine`` front (tokenize, validate, assemble results) needs from whatever runs
the scheduler and the model — in this process, or in Ray actors (``sgl_ray.actors``)."""

from __future__ import annotations

import gc
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.entrypoints.loop import EngineLoop, OverlapExecutor, StepExecutor
from sgl_ray.errors import EngineDeadError, InvalidRequestError
from sgl_ray.lora.adapter import parse_lora_paths
from sgl_ray.runner.model_runner import ModelRunner
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.scheduler.plan import StepOutput, StepPlan
from sgl_ray.scheduler.request import Req
from sgl_ray.scheduler.scheduler import Scheduler, SchedulerConfig
from sgl_ray.speculative.config import SpeculativeConfig

OutputSink = Callable[[RequestOutput | BaseException], None]


class EngineCore(ABC):
    """Contract: ``add`` queues requests and later calls ``sink`` with every :class:`RequestOutput` of them (the
    last one ``finished``), or once with an exception if they are rejected or the core dies; ``sink`` may be
    called from another thread. ``abort`` is fire-and-forget."""

    @abstractmethod
    def add(self, reqs: list[Req], sink: OutputSink) -> None: ...

    @abstractmethod
    def abort(self, rid: str) -> None: ...

    @abstractmethod
    def flush_cache(self) -> bool: ...

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def prefix_summary(self, block: int) -> frozenset[int]:
        """Chained block hashes of every prefix in the prefix cache (see ``mem_cache.prefix_hash``)."""

    @abstractmethod
    def load_lora_adapter(self, name: str, path: str, pinned: bool) -> None:
        """Register an adapter (already checked by the caller) in every engine group."""

    @abstractmethod
    def unload_lora_adapter(self, name: str) -> bool:
        """Remove an adapter; False when deferred until the requests using it finish."""

    @abstractmethod
    def lora_adapters(self) -> dict[str, dict]:
        """``{name: {"path", "pinned", "loaded"}}`` ("loaded": in a runner slot now)."""

    @abstractmethod
    def shutdown(self) -> None: ...


def overlap_schedule(args: EngineArgs) -> bool:
    """Whether steps are planned while the previous one runs (``disable_overlap_schedule`` off). Not with NGRAM
    speculation: its drafts are looked up in the tokens the scheduler has, which lack those still in flight (a
    drafter on the runner, a draft model or an EAGLE head, sees them)."""
    spec = SpeculativeConfig.from_args(args)
    return not args.disable_overlap_schedule and (spec is None or spec.uses_draft_model)


def scheduler_config(
    args: EngineArgs,
    num_slots: int,
    max_reqs: int,
    context_length: int,
    overlap: bool = False,
    vocab_size: int = 0,
    defer_grammar_masks: bool = False,
    kv_window: int | None = None,
    kv_swa_slots: int = 0,
) -> SchedulerConfig:
    device = args.torch_device()
    return SchedulerConfig(
        num_slots=num_slots,
        max_reqs=max_reqs,
        context_length=context_length,
        page_size=args.page_size,
        max_running_requests=max_reqs,
        max_prefill_tokens=args.max_prefill_tokens,
        chunked_prefill_size=args.effective_chunked_prefill_size(device),
        mixed_chunks=args.effective_mixed_chunk(device),
        policy=args.schedule_policy,
        enable_prefix_cache=not args.disable_radix_cache,
        overlap=overlap,
        defer_grammar_masks=overlap and defer_grammar_masks,
        max_loras_per_batch=args.max_loras_per_batch if args.lora_enabled else 0,
        vocab_size=vocab_size,
        grammar_backend=args.grammar_backend,
        grammar_compile_timeout=args.grammar_compile_timeout,
        enable_jump_forward=args.effective_jump_forward(device),
        speculative=SpeculativeConfig.from_args(args),
        kv_window=kv_window,
        kv_swa_slots=kv_swa_slots,
    )


def new_scheduler(
    args: EngineArgs,
    num_slots: int,
    max_reqs: int,
    context_length: int,
    tokenizer,
    overlap: bool = False,
    vocab_size: int = 0,
    defer_grammar_masks: bool = False,
    kv_window: int | None = None,
    kv_swa_slots: int = 0,
) -> Scheduler:
    """A scheduler with the adapters of ``args.lora_paths`` registered (checked by the ``Engine`` front).
    ``defer_grammar_masks``: the executor can take a step's masks after launching it (in-process overlap)."""
    config = scheduler_config(
        args,
        num_slots,
        max_reqs,
        context_length,
        overlap,
        vocab_size,
        defer_grammar_masks,
        kv_window,
        kv_swa_slots,
    )
    sched = Scheduler(config, tokenizer)
    for name, path in parse_lora_paths(args.lora_paths).items():
        assert sched.lora is not None
        sched.lora.register(name, path)
    return sched


def lora_call(s: Scheduler, method: str, *a):
    """Run an :class:`~sgl_ray.lora.pool.AdapterPool` method on a scheduler (error if LoRA is off)."""
    if s.lora is None:
        raise InvalidRequestError("LoRA is not enabled on this engine (enable_lora)", param="lora_name")
    return getattr(s.lora, method)(*a)


def scheduler_stats(s: Scheduler) -> dict[str, Any]:
    kv = s.kv
    return {
        "num_running": len(s.running),
        "num_waiting": len(s.waiting),
        "kv_capacity": kv.capacity,
        "kv_free": kv.allocator.num_free_slots,
        "cache_size": kv.cache.total_size if kv.cache else 0,
        "kv_peak_held": kv.peak_held,
        # hybrid KV pools (models mixing full and sliding-window layers): the windowed layers' pool
        "kv_swa_capacity": kv.swa_capacity,
        "kv_swa_free": kv.slot_map.swa.num_free_slots if kv.slot_map is not None else 0,
        "kv_swa_peak_held": kv.peak_swa_held,
        "peak_running": kv.peak_running,
        "num_preemptions": s.num_preemptions,
        "num_deferred_mask_steps": s.num_deferred_mask_steps,
        **(s.speculation.stats_dict() if s.speculation is not None else {}),
    }


def prefix_summary(s: Scheduler, block: int) -> frozenset[int]:
    return s.kv.cache.summary(block) if s.kv.cache is not None else frozenset()


class SchedulerCalls:
    """Requests answered by the scheduler between two steps, for whatever owns its :class:`EngineLoop` as
    ``self.loop`` (the in-process core here, the ``GlobalScheduler`` actor in ``sgl_ray.actors``)."""

    loop: EngineLoop

    def flush_cache(self) -> bool:
        return self.loop.call(lambda s: s.flush_cache())

    def prefix_summary(self, block: int) -> frozenset[int]:
        return self.loop.call(lambda s: prefix_summary(s, block))

    def load_lora_adapter(self, name: str, path: str, pinned: bool) -> None:
        """Register an adapter; every shard loads its slice when the scheduler first puts it in a slot."""
        self.loop.call(lambda s: lora_call(s, "register", name, path, pinned))

    def unload_lora_adapter(self, name: str) -> bool:
        return self.loop.call(lambda s: lora_call(s, "unregister", name))

    def lora_adapters(self) -> dict[str, dict]:
        return self.loop.call(lambda s: s.lora.adapters() if s.lora is not None else {})


class InProcessCore(SchedulerCalls, EngineCore):
    """Scheduler and model runner on a background thread of this process."""

    def __init__(self, args: EngineArgs, model_config: ModelConfig, weights, tokenizer: Any) -> None:
        self.runner = ModelRunner(args, model_config, weights)
        info = self.runner.info
        overlap = overlap_schedule(args)
        self.scheduler = new_scheduler(
            args,
            info.num_slots,
            info.max_reqs,
            info.context_length,
            tokenizer,
            overlap,
            info.vocab_size,
            defer_grammar_masks=True,
            kv_window=info.kv_window,
            kv_swa_slots=info.swa_num_slots,
        )
        runner = self.runner
        executor = OverlapExecutor(runner.launch, runner.collect, runner.sample_deferred, overlap=overlap)
        self.loop = EngineLoop(self.scheduler, executor)

    def add(self, reqs: list[Req], sink: OutputSink) -> None:
        self.loop.add(reqs, sink)

    def abort(self, rid: str) -> None:
        self.loop.abort(rid)

    def stats(self) -> dict[str, Any]:
        def both(s: Scheduler) -> dict[str, Any]:
            runner = self.runner
            load = runner.expert_load() if runner is not None else None
            return {
                **scheduler_stats(s),
                **({"expert_tokens": load} if load is not None else {}),
                **({"weight_bytes": runner.weight_bytes} if runner is not None else {}),
            }

        return self.loop.call(both)

    def shutdown(self) -> None:
        """Stop the loop, then let go of the runner: its weights, KV pool and CUDA graphs go back to the device
        (so another engine can start in this process)."""
        self.loop.stop()
        self.scheduler.grammars.shutdown()
        if self.loop.alive or self.runner is None:  # a stuck step still uses the runner
            return
        device = self.runner.device
        self.runner = None
        self.loop.executor = StepExecutor(_shut_down)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _shut_down(plan: StepPlan) -> StepOutput:
    raise EngineDeadError("the engine is shut down")


def create_ray_core(args: EngineArgs, model_config: ModelConfig) -> EngineCore:
    """The Ray-backed core (shard actors + a global scheduler actor), imported lazily so this package never
    depends on Ray."""
    return importlib.import_module("sgl_ray.actors").create_engine_core(args, model_config)
