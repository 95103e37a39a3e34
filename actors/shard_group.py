"""A tensor × pipeline group of shard actors in one placement group, driven through a Ray Compiled Graph.

The compiled graph gives every step a fixed shared-memory (or NCCL-free, pickled) channel from the scheduler to
all shards and back, instead of a ``ray.get`` round trip per shard per step.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import ray
from ray.dag import InputNode, MultiOutputNode
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sgl_ray.actors.shard_worker import ShardWorker
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.parallel import ParallelLayout
from sgl_ray.runner.memory import KVCapacity
from sgl_ray.runner.model_runner import RunnerInfo
from sgl_ray.scheduler.plan import StepOutput, StepPlan

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 600.0


class ShardGroup:
    """Starts, drives and tears down the shard actors of one engine group.

    Example::

        >>> group = ShardGroup(args, ParallelLayout(tp_size=2))  # doctest: +SKIP
        >>> info = group.start()  # doctest: +SKIP
        >>> out = group.execute(plan)  # doctest: +SKIP
    """

    def __init__(self, args: EngineArgs, layout: ParallelLayout, step_timeout_s: float = 600.0) -> None:
        self.args = args
        self.layout = layout
        self.step_timeout_s = step_timeout_s
        self.workers: list = []
        self.pg = None
        self.dag = None
        self.control_overhead_s: deque[float] = deque(maxlen=10_000)

    def start(self) -> RunnerInfo:
        t0 = time.monotonic()
        gpu = self.args.torch_device().type == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        strategy = "STRICT_PACK" if len(ray.nodes()) == 1 else "PACK"
        self.pg = placement_group([dict(bundle) for _ in range(self.layout.world_size)], strategy=strategy)
        ray.get(self.pg.ready(), timeout=_READY_TIMEOUT_S)
        actor = ray.remote(ShardWorker)
        self.workers = [
            actor.options(
                num_cpus=1,
                num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(i, self.layout)
            for i in range(self.layout.world_size)
        ]
        master = ray.get(self.workers[0].rendezvous_address.remote())
        proposals = ray.get(
            [w.setup.remote(self.args, master) for w in self.workers], timeout=_READY_TIMEOUT_S
        )
        capacity = KVCapacity(
            num_slots=min(p.num_slots for p in proposals), max_reqs=min(p.max_reqs for p in proposals)
        )
        infos = ray.get([w.init_memory.remote(capacity) for w in self.workers])
        with InputNode() as plan:
            dag = MultiOutputNode([w.execute.bind(plan) for w in self.workers])
        self.dag = dag.experimental_compile()
        logger.info(
            "shard group %s up in %.1fs: %d KV slots", self.layout, time.monotonic() - t0, capacity.num_slots
        )
        return infos[self.layout.output_rank]

    def submit(self, plan: StepPlan):
        """Send a plan to every shard without waiting (several may be in flight: pipeline stages overlap)."""
        assert self.dag is not None, "start() first"
        return self.dag.execute(plan), time.perf_counter()

    def wait(self, handle) -> StepOutput:
        """The answer of a submitted plan, from the last stage's first tensor-parallel rank. Raises whatever Ray
        raises when a shard is gone (the caller rebuilds the group)."""
        ref, sent = handle
        out = ray.get(ref, timeout=self.step_timeout_s)[self.layout.output_rank]
        if self.layout.pp_size == 1:  # with micro-batches in flight, wall time is not one step's
            self.control_overhead_s.append(time.perf_counter() - sent - out.compute_s)
        return out

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.wait(self.submit(plan))

    def overhead_summary(self) -> dict[str, float]:
        """Per-step control-path overhead (plan sent → tokens back, minus the output shard's compute), µs."""
        samples = sorted(self.control_overhead_s)
        if not samples:
            return {}
        pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1e6  # noqa: E731
        return {
            "control_overhead_us_p50": pick(0.5),
            "control_overhead_us_p99": pick(0.99),
            "control_overhead_steps": float(len(samples)),
        }

    def teardown(self) -> None:
        if self.dag is not None:
            try:
                self.dag.teardown()
            except Exception:  # a dead shard can make teardown itself fail; the actors are killed next
                logger.debug("compiled graph teardown failed", exc_info=True)
            self.dag = None
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
