"""The engine's background thread: feeds requests to the scheduler, runs steps, delivers outputs.

Other threads talk to it only through :meth:`EngineLoop.submit` (a thread-safe inbox), so the scheduler and
runner are touched by one thread only. Outputs go to the callback registered with each request.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sgl_ray.errors import EngineDeadError, SglRayError, StepLostError
from sgl_ray.scheduler.batch import ScheduledBatch
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.scheduler.plan import StepDrafts, StepOutput, StepPlan
from sgl_ray.scheduler.request import Req
from sgl_ray.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

OutputSink = Callable[[RequestOutput | BaseException], None]


@dataclass
class _Add:
    reqs: list[Req]
    sink: OutputSink


@dataclass
class _Abort:
    rid: str


@dataclass
class _Call:
    fn: Callable[[Scheduler], Any]
    done: threading.Event
    result: list[Any]


_STOP = object()


class StepExecutor:
    """Runs plans. ``submit`` may return before the step finishes; ``wait`` returns its output (raising
    :class:`~sgl_ray.errors.StepLostError` if the shards lost it). Up to ``depth`` steps may be in flight at
    once; this base class runs each plan synchronously (depth 1).

    ``overlap``: the steps in flight run one after another on one device (overlap scheduling: the next plan is
    built and launched while the previous step runs), so they may hold the same requests. Otherwise they are
    pipeline micro-batches over disjoint requests."""

    depth = 1
    overlap = False

    def __init__(self, execute: Callable[[StepPlan], StepOutput]) -> None:
        self._execute = execute

    def submit(self, plan: StepPlan) -> Any:
        return self._execute(plan)

    def wait(self, handle: Any) -> StepOutput:
        return handle

    def give_mask(self, handle: Any, vocab_mask: Any) -> Any:
        """For a plan submitted with ``mask_deferred``: its token masks; returns the handle to wait on."""
        raise NotImplementedError(f"{type(self).__name__} does not take deferred masks")

    def drafts(self, handle: Any) -> StepDrafts:
        """For a plan submitted with ``drafts_deferred``: what the runner's drafter proposed (its masks follow
        from them, through :meth:`give_mask`)."""
        raise NotImplementedError(f"{type(self).__name__} does not answer with drafts")


class OverlapExecutor(StepExecutor):
    """Steps on one device through ``launch``, which enqueues a step's work and returns at once, and ``collect``,
    which waits for its results (see ``ModelRunner.launch``); ``sample_deferred`` samples a step whose masks came
    later. ``overlap``: two steps in flight; else one (a step may still wait for masks built from its drafts)."""

    def __init__(
        self,
        launch: Callable[[StepPlan], Any],
        collect: Callable[[Any], StepOutput],
        sample_deferred: Callable[[Any, Any], Any] | None = None,
        overlap: bool = True,
    ) -> None:
        self._launch, self._collect, self._sample_deferred = launch, collect, sample_deferred
        self.overlap = overlap
        self.depth = 2 if overlap else 1

    def submit(self, plan: StepPlan) -> Any:
        return self._launch(plan)

    def wait(self, handle: Any) -> StepOutput:
        return self._collect(handle)

    def give_mask(self, handle: Any, vocab_mask: Any) -> Any:
        assert self._sample_deferred is not None
        return self._sample_deferred(handle, vocab_mask)

    def drafts(self, handle: Any) -> StepDrafts:
        assert handle.drafts is not None, "the step was not launched with drafts_deferred"
        return handle.drafts


class EngineLoop:
    def __init__(
        self, scheduler: Scheduler, execute: Callable[[StepPlan], StepOutput] | StepExecutor
    ) -> None:
        self.scheduler = scheduler
        self.executor = execute if isinstance(execute, StepExecutor) else StepExecutor(execute)
        self.max_in_flight = 0  # most batches seen in flight at once (pipeline micro-batching at work)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, OutputSink] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sgl-ray-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def add(self, reqs: list[Req], sink: OutputSink) -> None:
        if not self.alive:
            raise EngineDeadError(
                "the engine is shut down" if self._error is None else f"engine died: {self._error}"
            )
        self._inbox.put(_Add(reqs, sink))

    def abort(self, rid: str) -> None:
        self._inbox.put(_Abort(rid))

    def call(self, fn: Callable[[Scheduler], Any], timeout: float | None = None) -> Any:
        """Run ``fn(scheduler)`` on the loop thread between steps and return its result."""
        if not self.alive:
            raise EngineDeadError("the engine is shut down")
        call = _Call(fn, threading.Event(), [])
        self._inbox.put(call)
        if not call.done.wait(timeout):
            raise TimeoutError("the engine did not answer in time")
        if isinstance(call.result[0], BaseException):
            raise call.result[0]
        return call.result[0]

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive:
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    def _handle(self, msg: Any) -> bool:
        sched = self.scheduler
        if msg is _STOP:
            return False
        if isinstance(msg, _Add):
            for i, req in enumerate(msg.reqs):
                try:
                    sched.add_request(req)
                    self._sinks[req.rid] = msg.sink
                except SglRayError as e:  # reject this request and the rest of its batch
                    for r in msg.reqs[:i]:
                        sched.abort(r.rid)
                        self._sinks.pop(r.rid, None)
                    msg.sink(e)
                    break
        elif isinstance(msg, _Abort):
            sched.abort(msg.rid)
        elif isinstance(msg, _Call):
            try:
                msg.result.append(msg.fn(sched))
            except BaseException as e:  # handed back to the caller
                msg.result.append(e)
            msg.done.set()
        return True

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for rid, error in self.scheduler.take_rejections():
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                sink(error)
        for out in outputs:
            sink = self._sinks.get(out.rid)
            if out.finished:
                self._sinks.pop(out.rid, None)
            if sink is not None:
                sink(out)

    def _run(self) -> None:
        """Keep up to ``executor.depth`` batches in flight; process results in submission order."""
        sched, ex = self.scheduler, self.executor
        in_flight: deque[tuple[ScheduledBatch, Any]] = deque()
        try:
            while True:
                block = not sched.has_work and not in_flight
                try:
                    msg = self._inbox.get() if block else self._inbox.get_nowait()
                    if not self._handle(msg):
                        break
                    continue  # drain the inbox before stepping
                except queue.Empty:
                    pass
                try:
                    if len(in_flight) < ex.depth:
                        batch = sched.schedule(1 if ex.overlap else ex.depth)
                        if batch.worth_running:
                            in_flight.append((batch, ex.submit(batch.plan)))
                            if batch.plan.drafts_deferred:  # its masks follow from the runner's drafts
                                in_flight[-1] = _with_draft_masks(ex, *in_flight[-1])
                            self.max_in_flight = max(self.max_in_flight, len(in_flight))
                            if len(in_flight) < ex.depth and batch.entries:
                                continue  # fill the pipeline before waiting
                        elif not in_flight:  # nothing runnable now: hand out aborts, then wait a moment
                            self._deliver(sched.take_pending_outputs())
                            try:
                                if not self._handle(self._inbox.get(timeout=0.005)):
                                    break
                            except queue.Empty:
                                pass
                            continue
                    batch, handle = in_flight.popleft()
                    outputs = sched.process(batch, ex.wait(handle))
                    if in_flight and _awaits_token_masks(
                        in_flight[0][0].plan
                    ):  # they follow from those tokens
                        in_flight[0] = _with_masks(ex, *in_flight[0])
                except StepLostError:
                    in_flight.clear()
                    outputs = sched.lose_in_flight()
                self._deliver(outputs)
        except BaseException as e:  # the runner or scheduler failed: fail every request, loudly
            logger.exception("engine loop crashed")
            self._error = e
            err = EngineDeadError(f"engine died: {type(e).__name__}: {e}")
            for sink in set(self._sinks.values()):
                sink(err)
            self._sinks.clear()
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        err = EngineDeadError("the engine is shut down")
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(msg, _Add):
                msg.sink(err)
            elif isinstance(msg, _Call):
                msg.result.append(err)
                msg.done.set()
        for sink in set(self._sinks.values()):
            sink(err)
        self._sinks.clear()


def _awaits_token_masks(plan: StepPlan) -> bool:
    """Whether a plan in flight waits for masks that follow from the tokens of the step before it (those of a
    ``drafts_deferred`` plan were built from its drafts as soon as it was launched)."""
    return plan.mask_deferred and not plan.drafts_deferred


def _with_masks(ex: StepExecutor, batch: ScheduledBatch, handle: Any) -> tuple[ScheduledBatch, Any]:
    """Give a deferred step its masks; no name in the loop keeps its handle (and, once read, its output) after."""
    return batch, ex.give_mask(handle, batch.deferred_mask())


def _with_draft_masks(ex: StepExecutor, batch: ScheduledBatch, handle: Any) -> tuple[ScheduledBatch, Any]:
    """Give a step launched with ``drafts_deferred`` the masks built from its drafts."""
    return batch, ex.give_mask(handle, batch.draft_masks(ex.drafts(handle)))
