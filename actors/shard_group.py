"""A tensor × pipeline group of shard actors in one placement group, driven through a Ray Compiled Graph.

The compiled graph gives every step a fixed shared-memory (or NCCL-free, pickled) channel from the scheduler to
all shards and back, instead of a ``ray.get`` round trip per shard per step.

With overlap scheduling (``lagged``) the graph calls :meth:`ShardWorker.step` with a
:class:`~sgl_ray.actors.shard_worker.ShardCall`, whose answer is the output of the step sent with the *previous*
call: call k launches plan k, then collects step k-1. So the output of step k comes back with call k+1, and waiting
for the last step sent first sends a flush (no plan), which only collects::

    calls     0: plan 0      1: plan 1      2: plan 2      3: flush
    answers   (nothing)      step 0         step 1         step 2

Constrained requests run ahead too. Their masks depend on the token still in flight, so a plan may be sent with
``mask_deferred`` (marked *): the shards run its forward pass and hold its logits. Once the scheduler has processed
the step before it, :meth:`ShardGroup.give_mask` hands over its masks (:class:`DeferredMasks`, only the
constrained rows, packed), and they travel with the next call, a plan or a flush. Every shard first samples the
deferred step under them, then launches the plan (which may read that step's tokens), then collects::

    calls     0: plan 0      1: plan 1*     2: masks 1 + plan 2*    3: masks 2 + flush
    shards    launch 0       launch 1       sample 1, launch 2      sample 2
              ─              collect 0      collect 1               collect 2
    answers   (nothing)      step 0         step 1                  step 2

    scheduler: process step 0 → masks 1 → plan 2 → send call 2 (the device runs step 1's forward meanwhile)

No plan goes out while a step waits for its masks (the runner holds one deferred step at a time), and a deferred
step's output is waited for only after its masks were given.

A plan whose constrained requests get drafts from the shards' own drafter (speculative decoding,
``drafts_deferred``) is answered with those drafts first: the shards draft and run the forward pass, and the output
rank answers with the drafts (:meth:`ShardGroup.drafts`), the masks built from them go out next
(:meth:`ShardGroup.give_mask`). Without overlap that is a call of its own, which answers with the step's output;
lagged, the drafts come with the answer of the call that sent the plan (the output of the step before), and the
masks travel with the next call as above. Speculating requests run ahead of their verify steps like any other:
each shard starts the next chunk where the rejected drafts did (``runner.ahead``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import ray
from ray.dag import InputNode, MultiOutputNode
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sgl_ray.actors.placement import ShardBundles, reserve
from sgl_ray.actors.shard_worker import DeferredMasks, ShardCall, ShardWorker, owned
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.parallel import ParallelLayout
from sgl_ray.runner.memory import KVCapacity
from sgl_ray.runner.model_runner import RunnerInfo
from sgl_ray.scheduler.plan import StepDrafts, StepOutput, StepPlan

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 600.0


@dataclass(eq=False)
class LaggedStep:
    """A plan sent to a lagged group; ``output`` is filled in when the call that carries it is read."""

    step_id: int
    output: StepOutput | None = None
    drafts: StepDrafts | None = None  # with ``drafts_deferred``: set when the call that sent it is read


@dataclass(frozen=True)
class _Call:
    ref: object  # the compiled graph's reference to this call's answers
    sent: float
    carries: LaggedStep | None  # the step whose output this call answers
    launches: LaggedStep | None = None  # the step whose plan it sent (its drafts come back with this answer)


class ShardGroup:
    """Starts, drives and tears down the shard actors of one engine group.

    Example::

        >>> group = ShardGroup(args, ParallelLayout(tp_size=2), lagged=True)  # doctest: +SKIP
        >>> info = group.start()  # doctest: +SKIP
        >>> step1, step2 = group.submit(plan1), group.submit(plan2)  # doctest: +SKIP
        >>> out1, out2 = group.wait(step1), group.wait(step2)  # doctest: +SKIP
        >>> # plan4 with mask_deferred: its masks follow once step 3's tokens are processed
        >>> step3, step4 = group.submit(plan3), group.submit(plan4)  # doctest: +SKIP
        >>> out3 = group.wait(step3); group.give_mask(step4, masks4); out4 = group.wait(step4)  # doctest: +SKIP
    """

    def __init__(
        self, args: EngineArgs, layout: ParallelLayout, step_timeout_s: float = 600.0, lagged: bool = False
    ) -> None:
        assert not lagged or layout.pp_size == 1, "overlap scheduling runs one stage (pipelines micro-batch)"
        self.args = args
        self.layout = layout
        self.step_timeout_s = step_timeout_s
        self.lagged = lagged
        self.workers: list = []
        self.pg = None
        self.dag = None
        self.control_overhead_s: deque[float] = deque(maxlen=10_000)
        self._calls: deque[_Call] = deque()  # lagged: sent, answers not read yet (read strictly in order)
        self._tail: LaggedStep | None = None  # lagged: the last step sent, its output not yet asked for
        self._masks_due: LaggedStep | None = None  # lagged: sent with ``mask_deferred``, masks not given yet
        self._masks: DeferredMasks | None = None  # lagged: given, to travel with the next call
        self.weight_bytes: list[int] = []  # per rank, set by start()

    def start(self) -> RunnerInfo:
        """Reserve the placement group, start the shards and load the model; on failure nothing stays behind.
        Raises :class:`~sgl_ray.errors.InsufficientResourcesError` at once when the cluster can never hold the
        shards, :class:`~sgl_ray.errors.ResourcesBusyError` after ``args.placement_timeout`` when it is busy."""
        try:
            return self._start()
        except BaseException:
            self.teardown()
            raise

    def _start(self) -> RunnerInfo:
        t0 = time.monotonic()
        gpu = self.args.torch_device().type == "cuda"
        shards = ShardBundles.for_shards(
            self.layout.world_size, gpu, f"tp_size {self.layout.tp_size} × pp_size {self.layout.pp_size}"
        )
        self.pg = reserve(shards, self.args.placement_timeout)  # typed errors: never fits / busy too long
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
            num_slots=min(p.num_slots for p in proposals),
            max_reqs=min(p.max_reqs for p in proposals),
            swa_num_slots=min(p.swa_num_slots for p in proposals),  # hybrid KV pools (0: off)
        )
        infos = ray.get([w.init_memory.remote(capacity) for w in self.workers])
        self.weight_bytes = [info.weight_bytes for info in infos]  # per rank, weights as held
        with InputNode() as sent:  # a StepPlan, or (lagged) a ShardCall
            dag = MultiOutputNode([(w.step if self.lagged else w.execute).bind(sent) for w in self.workers])
        self.dag = dag.experimental_compile()
        logger.info(
            "shard group %s up in %.1fs: %d KV slots", self.layout, time.monotonic() - t0, capacity.num_slots
        )
        return infos[self.layout.output_rank]

    def submit(self, plan: StepPlan):
        """Send a plan to every shard without waiting (several may be in flight: pipeline stages overlap, or,
        lagged, a step runs while the next is planned); ``wait`` takes the handle, in submission order."""
        assert self.dag is not None, "start() first"
        if not self.lagged:
            return self.dag.execute(plan), time.perf_counter(), plan.step_id
        assert self._masks_due is None, "give_mask() for the deferred step before sending another plan"
        step = LaggedStep(plan.step_id)
        self._send(plan, self._tail, step)
        self._tail = step
        if plan.mask_deferred:
            self._masks_due = step
        return step

    def give_mask(self, handle, vocab_mask: np.ndarray | None):
        """The masks of a step sent with ``mask_deferred``; returns the handle to wait on. Lagged: they go out with
        the next call. Otherwise (a plan with ``drafts_deferred``, whose :meth:`drafts` were read): they go out
        now, in a call of their own."""
        if not self.lagged:
            assert self.dag is not None, "start() first"
            _, sent, step_id = handle
            return self.dag.execute(DeferredMasks.pack(step_id, vocab_mask)), sent, step_id
        assert handle is self._masks_due, "this step does not wait for masks"
        self._masks_due = None
        self._masks = DeferredMasks.pack(handle.step_id, vocab_mask)
        return handle

    def drafts(self, handle) -> StepDrafts:
        """The drafts a plan sent with ``drafts_deferred`` answers with; :meth:`give_mask` sends its masks next.
        Lagged, they come with the answer of the call that sent the plan (the output of the step before it)."""
        if self.lagged:
            while handle.drafts is None:
                assert self._calls, "drafts of a step this group never sent with drafts_deferred"
                self._read_call()
            return handle.drafts
        ref, _, _ = handle
        return owned(ray.get(ref, timeout=self.step_timeout_s)[self.layout.output_rank])

    def wait(self, handle) -> StepOutput:
        """The answer of a submitted plan, from the last stage's first tensor-parallel rank. Raises whatever Ray
        raises when a shard is gone (the caller rebuilds the group)."""
        if self.lagged:
            return self._wait_lagged(handle)
        ref, sent, _ = handle
        out = owned(ray.get(ref, timeout=self.step_timeout_s)[self.layout.output_rank])  # see owned()
        if self.layout.pp_size == 1:  # with micro-batches in flight, wall time is not one step's
            self.control_overhead_s.append(time.perf_counter() - sent - out.compute_s)
        return out

    def _send(
        self, plan: StepPlan | None, carries: LaggedStep | None, launches: LaggedStep | None = None
    ) -> None:
        assert self.dag is not None, "start() first"
        call, self._masks = ShardCall(plan, self._masks), None
        self._calls.append(_Call(self.dag.execute(call), time.perf_counter(), carries, launches))

    def _wait_lagged(self, step: LaggedStep) -> StepOutput:
        assert step is not self._masks_due, "give_mask() first: this step samples once its masks come"
        if step is self._tail:  # no call sent after it carries its output: flush
            self._send(None, step)
            self._tail = None
        while step.output is None:
            assert self._calls, "waited for a step this group never sent"
            self._read_call()
        return step.output

    def _read_call(self) -> None:
        """Read the answer of the oldest call not read yet (answers are read strictly in order)."""
        call = self._calls.popleft()
        reply = ray.get(call.ref, timeout=self.step_timeout_s)[self.layout.output_rank]
        if call.carries is not None:
            assert reply.output is not None, "the shards lost track of the step in flight"
            call.carries.output = owned(reply.output)  # the handle may be kept: see owned()
            self.control_overhead_s.append(time.perf_counter() - call.sent - reply.call_s)
        if reply.drafts is not None and call.launches is not None:
            call.launches.drafts = owned(reply.drafts)

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.wait(self.submit(plan))

    def overhead_summary(self) -> dict[str, float]:
        """Per-step control-path overhead in µs: wall time of a graph call (plan sent → answer read) minus the
        time the output shard spent in it, i.e. moving the plan out and the answer back. Without overlap the
        device idles for this (and for the scheduler's own work) every step; lagged, both happen while the next
        step already queued on the device runs (``gpu_idle_fraction`` tells how much of it stays hidden)."""
        samples = sorted(self.control_overhead_s)
        if not samples:
            return {}
        pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1e6  # noqa: E731
        return {
            "control_overhead_us_p50": pick(0.5),
            "control_overhead_us_p99": pick(0.99),
            "control_overhead_steps": float(len(samples)),
        }

    def start_step_trace(self) -> None:
        """Start recording every shard's device step times (while the group is idle: between requests)."""
        ray.get([w.start_step_trace.remote() for w in self.workers])

    def stop_step_trace(self, batch_size: int | None = None, skip: int = 0) -> float | None:
        """The largest device idle share between steps over the shards (see ``ShardWorker.stop_step_trace``);
        None where the shards record nothing (CPU)."""
        shares = ray.get([w.stop_step_trace.remote(batch_size, skip) for w in self.workers])
        return max((s for s in shares if s is not None), default=None)

    def expert_load(self) -> dict[str, list[int]] | None:
        """MoE models: tokens per expert of every sparse layer, added up over the shards that count them (see
        ``sgl_ray.layers.moe.dispatch``; each stage's shards report their own layers)."""
        total: dict[str, list[int]] = {}
        for load in ray.get([w.expert_load.remote() for w in self.workers]):
            for layer, counts in (load or {}).items():
                have = total.setdefault(layer, [0] * len(counts))
                total[layer] = [a + b for a, b in zip(have, counts, strict=True)]
        return total or None

    def teardown(self) -> None:
        if self.dag is not None:
            try:
                self.dag.teardown()
            except Exception:  # a dead shard can make teardown itself fail; the actors are killed next
                logger.debug("compiled graph teardown failed", exc_info=True)
            self.dag = None
        self._calls.clear()
        self._tail = self._masks_due = self._masks = None
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
