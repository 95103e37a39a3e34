"""``GlobalScheduler``: the Ray actor that owns the waiting queue, the policy, the radix tree and page-allocator
metadata, and drives its shard group step by step.

Requests arrive as token ids with sampling parameters (``add_requests``); results leave as token/text deltas
through ``get_outputs`` (a long poll that returns everything produced since the last call). When a shard dies
the group is rebuilt and every running request resumes from the tokens it already generated.

With one pipeline stage, overlap scheduling (on unless ``disable_overlap_schedule``; not with NGRAM speculation)
keeps two steps in flight: the group is driven "lagged" (see :mod:`sgl_ray.actors.shard_group`), so a shard
launches step N+1 before it waits for step N, and the scheduler plans step N+2 while N+1 runs. Constrained
requests run ahead too: a step planned before its token masks exist is launched with ``mask_deferred``, and its
masks follow with the next call to the shards. Speculating requests run ahead of their verify steps: the shards
start the next chunk where the rejected drafts did (``runner.ahead``).
Pipelines keep one micro-batch per stage in flight.
"""

from __future__ import annotations

import functools
import logging
import queue
import time
from typing import Any

from ray.exceptions import RayError

from sgl_ray.actors.shard_group import ShardGroup
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.entrypoints.core import SchedulerCalls, new_scheduler, overlap_schedule, scheduler_stats
from sgl_ray.entrypoints.loop import EngineLoop, StepExecutor
from sgl_ray.errors import EngineDeadError, StepLostError
from sgl_ray.model_loader import load_tokenizer, resolve_model
from sgl_ray.parallel import ParallelLayout
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.scheduler.plan import StepDrafts, StepOutput, StepPlan
from sgl_ray.scheduler.request import Req

logger = logging.getLogger(__name__)

Delivery = tuple[list[str], RequestOutput | BaseException]  # (rids the item is for, the item)


class GlobalScheduler(SchedulerCalls):
    """Example (what :class:`~sgl_ray.actors.ray_core.RayEngineCore` does)::

    >>> sched = ray.remote(GlobalScheduler).options(max_concurrency=8).remote(args)  # doctest: +SKIP
    >>> ray.get(sched.start.remote())  # doctest: +SKIP
    >>> ray.get(sched.add_requests.remote(reqs))  # doctest: +SKIP
    >>> ray.get(sched.get_outputs.remote(0.5))  # doctest: +SKIP

    The shards start in :meth:`start`, not in the constructor, so that what stops them (a cluster that can never
    hold them, a model that does not load) reaches the caller as its own exception type, not as a dead actor.
    """

    def __init__(self, args: EngineArgs, max_rebuilds: int = 3) -> None:
        self.args = args
        self.layout = ParallelLayout(args.tp_size, args.pp_size, args.ep_size)
        self.overlap = args.pp_size == 1 and overlap_schedule(args)
        self.max_rebuilds = max_rebuilds
        self.num_rebuilds = 0

    def start(self) -> None:
        """Start the shard group and the scheduler loop (call once, first)."""
        args = self.args
        self.group = ShardGroup(args, self.layout, lagged=self.overlap)
        info = self.group.start()
        try:
            source = resolve_model(
                args.model_path, revision=args.revision, weights=args.load_format != "dummy"
            )
            tokenizer = None if args.skip_tokenizer_init else load_tokenizer(source, args.tokenizer_path)
        except BaseException:
            self.group.teardown()
            raise
        self.scheduler = new_scheduler(
            args,
            info.num_slots,
            info.max_reqs,
            info.context_length,
            tokenizer,
            self.overlap,
            info.vocab_size,
            defer_grammar_masks=self.overlap,  # their masks ride with the next call (see ShardGroup)
            kv_window=info.kv_window,
            kv_swa_slots=info.swa_num_slots,
        )
        self._outbox: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self.loop = EngineLoop(self.scheduler, _GroupExecutor(self))

    def _rebuild(self, error: BaseException) -> StepLostError:
        if self.num_rebuilds >= self.max_rebuilds:
            raise EngineDeadError(
                f"shard group failed {self.num_rebuilds + 1} times; last: {error}"
            ) from error
        self.num_rebuilds += 1
        logger.warning(
            "shard group failed (%s); rebuilding (%d/%d)", error, self.num_rebuilds, self.max_rebuilds
        )
        t0 = time.monotonic()
        self.group.teardown()
        self.group = ShardGroup(self.args, self.layout, lagged=self.overlap)  # no steps in flight: lag reset
        self.group.start()
        logger.warning("shard group rebuilt in %.1fs", time.monotonic() - t0)
        return StepLostError(str(error))

    def _deliver(self, rids: list[str], item: RequestOutput | BaseException) -> None:
        self._outbox.put((rids, item))

    # --- the actor's API -------------------------------------------------------------------------------------
    def add_requests(self, reqs: list[Req]) -> None:
        self.loop.add(reqs, functools.partial(self._deliver, [r.rid for r in reqs]))

    def abort(self, rid: str) -> None:
        self.loop.abort(rid)

    def get_outputs(self, timeout_s: float = 1.0) -> list[Delivery]:
        """Everything delivered since the last call; waits up to ``timeout_s`` for the first item."""
        try:
            items = [self._outbox.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._outbox.get_nowait())
            except queue.Empty:
                return items

    def stats(self) -> dict[str, Any]:
        load = self.group.expert_load()
        return {
            **self.loop.call(scheduler_stats),
            **({"expert_tokens": load} if load is not None else {}),
            "weight_bytes": sum(self.group.weight_bytes),  # over the group's shards
            "weight_bytes_per_shard": self.group.weight_bytes,
            "num_rebuilds": self.num_rebuilds,
            "max_batches_in_flight": self.loop.max_in_flight,
            "overlap_schedule": self.overlap,
            **self.group.overhead_summary(),
        }

    def start_step_trace(self) -> None:
        """Start recording the shards' device step times (call between requests; see ``ShardGroup``)."""
        self.group.start_step_trace()

    def stop_step_trace(self, batch_size: int | None = None, skip: int = 0) -> float | None:
        """The device idle share between the steps recorded since ``start_step_trace`` (None on CPU)."""
        return self.group.stop_step_trace(batch_size, skip)

    def shard_handles(self) -> list:
        """The shard actors (for fault-injection tests and diagnostics)."""
        return list(self.group.workers)

    def shutdown(self) -> None:
        self.loop.stop()
        self.scheduler.grammars.shutdown()
        self.group.teardown()

    def ready(self) -> bool:
        return self.loop.alive


class _GroupExecutor(StepExecutor):
    """Submits plans to the scheduler's current shard group: two steps in flight with overlap scheduling, else
    one micro-batch per pipeline stage. A step submitted to a group that has since been rebuilt is lost."""

    def __init__(self, owner: GlobalScheduler) -> None:
        self.owner = owner
        self.overlap = owner.overlap
        self.depth = 2 if owner.overlap else owner.layout.pp_size

    def submit(self, plan: StepPlan):
        try:
            return self.owner.group, self.owner.group.submit(plan)
        except RayError as e:
            raise self.owner._rebuild(e) from e

    def wait(self, handle) -> StepOutput:
        group, inner = self._current(handle)
        try:
            return group.wait(inner)
        except RayError as e:
            raise self.owner._rebuild(e) from e

    def give_mask(self, handle, vocab_mask):
        """A deferred step's masks: queued for the group's next call (overlap), or sent at once (masks built from
        the step's drafts)."""
        group, inner = self._current(handle)
        try:
            return group, group.give_mask(inner, vocab_mask)
        except RayError as e:
            raise self.owner._rebuild(e) from e

    def drafts(self, handle) -> StepDrafts:
        group, inner = self._current(handle)
        try:
            return group.drafts(inner)
        except RayError as e:
            raise self.owner._rebuild(e) from e

    def _current(self, handle) -> tuple[ShardGroup, Any]:
        group, inner = handle
        if group is not self.owner.group:  # submitted to a group that has since been replaced
            raise StepLostError("shard group was rebuilt")
        return group, inner
