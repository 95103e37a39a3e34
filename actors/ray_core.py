"""The driver side of a Ray engine: submits requests to a ``GlobalScheduler`` actor and routes its outputs to the
callers; data parallelism spreads requests over several such groups.

If the scheduler actor itself dies, a new one (with a new shard group) is started and the requests in flight are
resubmitted with the tokens they already produced, so they continue where they stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from sgl_ray.actors.cluster import ensure_ray
from sgl_ray.actors.placement import ShardBundles, check_fits
from sgl_ray.actors.scheduler_actor import GlobalScheduler
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.entrypoints.core import EngineCore, OutputSink
from sgl_ray.errors import EngineDeadError, SglRayError
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.scheduler.request import Req

logger = logging.getLogger(__name__)

_POLL_S = 0.5


def resolve_device(args: EngineArgs) -> EngineArgs:
    """``device="auto"`` settled by the cluster's devices, not by this process's: the scheduler actor holds no GPU
    (so would settle on the CPU, and start its shards there), and a driver such as a Serve replica may hold none
    while the cluster has some."""
    if args.device != "auto":
        return args
    return args.replace(device="cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu")


def _placeable(args: EngineArgs, groups: int) -> EngineArgs:
    """Connect to Ray (a local cluster gets a logical CPU per shard at least), settle the device, and fail at once
    with :class:`~sgl_ray.errors.InsufficientResourcesError` if the cluster can never hold ``groups`` shard groups."""
    world = args.tp_size * args.pp_size
    ensure_ray(args.ray_address, num_cpus=groups * world)
    args = resolve_device(args)
    layout = f"tp_size {args.tp_size} × pp_size {args.pp_size} × dp_size {groups}"
    check_fits(ShardBundles.for_shards(groups * world, args.torch_device().type == "cuda", layout))
    return args


def _own_error(error: RayTaskError) -> BaseException:
    """The sgl_ray error at the root of a failed actor call (a cluster too small, a model that does not load), as
    raised where it happened; other failures stay as Ray raised them."""
    root: BaseException = error
    while isinstance(root, RayTaskError) and root.cause is not None and root.cause is not root:
        root = root.cause
    return root if isinstance(root, SglRayError) else error


class RayEngineCore(EngineCore):
    """One engine group: a ``GlobalScheduler`` actor driving its shard actors."""

    def __init__(self, args: EngineArgs, max_restarts: int = 2) -> None:
        self.args = args = _placeable(args, groups=1)
        self.max_restarts = max_restarts
        self.num_restarts = 0
        self._lock = threading.Lock()
        self._sinks: dict[str, OutputSink] = {}
        self._inflight: dict[str, Req] = {}  # as submitted, plus the tokens received so far
        self._closed = False
        self._adapters: dict[str, tuple[str, bool]] = {}  # loaded at run time: re-registered after a restart
        self._actor = self._start_actor()
        self._poller = threading.Thread(target=self._poll, name="sgl-ray-outputs", daemon=True)
        self._poller.start()

    def _start_actor(self):
        actor = ray.remote(GlobalScheduler).options(num_cpus=0, max_concurrency=16).remote(self.args)
        try:
            ray.get(actor.start.remote())
        except RayTaskError as e:
            ray.kill(actor, no_restart=True)
            raise _own_error(e) from None
        for name, (path, pinned) in getattr(self, "_adapters", {}).items():
            ray.get(actor.load_lora_adapter.remote(name, path, pinned))
        return actor

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def add(self, reqs: list[Req], sink: OutputSink) -> None:
        if self._closed:
            raise EngineDeadError("the engine is shut down")
        with self._lock:
            for r in reqs:
                self._sinks[r.rid] = sink
                self._inflight[r.rid] = r
            actor = self._actor
        actor.add_requests.remote(reqs)

    def abort(self, rid: str) -> None:
        self._actor.abort.remote(rid)

    def flush_cache(self) -> bool:
        return ray.get(self._actor.flush_cache.remote())

    def stats(self) -> dict[str, Any]:
        return {**ray.get(self._actor.stats.remote()), "num_scheduler_restarts": self.num_restarts}

    def prefix_summary(self, block: int) -> frozenset[int]:
        return ray.get(self._actor.prefix_summary.remote(block))

    def load_lora_adapter(self, name: str, path: str, pinned: bool) -> None:
        ray.get(self._actor.load_lora_adapter.remote(name, path, pinned))
        self._adapters[name] = (path, pinned)

    def unload_lora_adapter(self, name: str) -> bool:
        done = ray.get(self._actor.unload_lora_adapter.remote(name))
        self._adapters.pop(name, None)
        return done

    def lora_adapters(self) -> dict[str, dict]:
        return ray.get(self._actor.lora_adapters.remote())

    def scheduler_actor(self):
        return self._actor

    def start_step_trace(self) -> None:
        """Start recording the shards' device time per step (benchmarks; call while no request runs)."""
        ray.get(self._actor.start_step_trace.remote())

    def stop_step_trace(self, batch_size: int | None = None, skip: int = 0) -> float | None:
        """Share of the time between the first and last recorded step (of ``batch_size`` rows, past the first
        ``skip``) that a shard's device waited for work; the largest over the shards. None on CPU.

        Example::

            >>> core.start_step_trace(); llm.generate(prompt, params); core.stop_step_trace(1, 2)  # doctest: +SKIP
            0.012
        """
        return ray.get(self._actor.stop_step_trace.remote(batch_size, skip))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            ray.get(self._actor.shutdown.remote(), timeout=60)
        except RayError:
            pass
        ray.kill(self._actor, no_restart=True)
        self._poller.join(timeout=5)
        self._fail_all(EngineDeadError("the engine is shut down"))

    # --- output routing ----------------------------------------------------------------------------------------
    def _poll(self) -> None:
        while not self._closed:
            try:
                items = ray.get(self._actor.get_outputs.remote(_POLL_S))
            except RayError as e:
                if self._closed:
                    return
                self._recover(e)
                continue
            for rids, item in items:
                self._route(rids, item)

    def _route(self, rids: list[str], item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            with self._lock:
                sinks = {id(s): s for rid in rids if (s := self._sinks.pop(rid, None)) is not None}
                for rid in rids:
                    self._inflight.pop(rid, None)
            for sink in sinks.values():
                sink(item)
            return
        with self._lock:
            sink = self._sinks.get(item.rid)
            req = self._inflight.get(item.rid)
            if req is not None:
                req.output_ids = req.output_ids + item.token_ids
            if item.finished:
                self._sinks.pop(item.rid, None)
                self._inflight.pop(item.rid, None)
        if sink is not None:
            sink(item)

    def _recover(self, error: BaseException) -> None:
        """The scheduler actor died: start a new one and resubmit what was in flight, tokens so far included."""
        if self.num_restarts >= self.max_restarts:
            logger.error("scheduler actor died again (%s); giving up", error)
            self._closed = True
            self._fail_all(EngineDeadError(f"the scheduler actor died: {error}"))
            return
        self.num_restarts += 1
        logger.warning(
            "scheduler actor died (%s); restarting (%d/%d)", error, self.num_restarts, self.max_restarts
        )
        try:
            actor = self._start_actor()
        except (RayError, SglRayError) as e:
            self._closed = True
            self._fail_all(EngineDeadError(f"could not restart the scheduler actor: {e}"))
            return
        with self._lock:
            self._actor = actor
            resume = [dataclasses.replace(r) for r in self._inflight.values()]
        if resume:
            actor.add_requests.remote(resume)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            sinks = {id(s): s for s in self._sinks.values()}
            self._sinks.clear()
            self._inflight.clear()
        for sink in sinks.values():
            sink(error)


class DataParallelCore(EngineCore):
    """Several engine groups behind one front; each prompt goes to the group with the fewest requests in flight
    (the ``n`` samples of one prompt stay together, so they share its cached prefix)."""

    def __init__(self, args: EngineArgs) -> None:
        args = _placeable(args, groups=args.dp_size)  # all groups' shards at once, before any starts
        self.groups = [RayEngineCore(args.replace(dp_size=1)) for _ in range(args.dp_size)]
        self._owner: dict[str, RayEngineCore] = {}

    def add(self, reqs: list[Req], sink: OutputSink) -> None:
        units: dict[int, list[Req]] = {}  # the n samples of one prompt form one unit
        for r in reqs:
            units.setdefault(id(r.group) if r.group is not None else id(r), []).append(r)
        load = {id(g): g.num_inflight for g in self.groups}
        assigned: dict[int, list[Req]] = {}
        for unit in units.values():
            group = min(self.groups, key=lambda g: load[id(g)])
            load[id(group)] += len(unit)
            assigned.setdefault(id(group), []).extend(unit)
            for r in unit:
                self._owner[r.rid] = group

        def forget(out: RequestOutput | BaseException) -> None:
            if isinstance(out, BaseException):
                for r in reqs:
                    self._owner.pop(r.rid, None)
            elif out.finished:
                self._owner.pop(out.rid, None)
            sink(out)

        for group in self.groups:
            if id(group) in assigned:
                group.add(assigned[id(group)], forget)

    def abort(self, rid: str) -> None:
        group = self._owner.get(rid)
        if group is not None:
            group.abort(rid)

    def flush_cache(self) -> bool:
        return all([g.flush_cache() for g in self.groups])

    def stats(self) -> dict[str, Any]:
        per_group = [g.stats() for g in self.groups]
        total = {
            k: sum(s.get(k, 0) for s in per_group)
            for k, v in per_group[0].items()
            if isinstance(v, int) and not isinstance(v, bool)  # counts add up; flags stay per group
        }
        loads = [s["expert_tokens"] for s in per_group if "expert_tokens" in s]
        if loads:  # the data-parallel groups' counts add up, expert by expert
            total["expert_tokens"] = {
                layer: [sum(c) for c in zip(*(load[layer] for load in loads), strict=True)]
                for layer in loads[0]
            }
        return {**total, "groups": per_group}

    def prefix_summary(self, block: int) -> frozenset[int]:
        return frozenset().union(*(g.prefix_summary(block) for g in self.groups))

    def load_lora_adapter(self, name: str, path: str, pinned: bool) -> None:
        for g in self.groups:
            g.load_lora_adapter(name, path, pinned)

    def unload_lora_adapter(self, name: str) -> bool:
        return all([g.unload_lora_adapter(name) for g in self.groups])

    def lora_adapters(self) -> dict[str, dict]:
        per_group = [g.lora_adapters() for g in self.groups]
        return {
            name: {**info, "loaded": any(p.get(name, {}).get("loaded") for p in per_group)}
            for name, info in per_group[0].items()
        }

    def shutdown(self) -> None:
        for g in self.groups:
            g.shutdown()
