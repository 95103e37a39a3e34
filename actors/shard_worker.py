"""``ShardWorker``: one model shard (its layers, its slice of every tensor-parallel layer, its KV pool, attention
backend and sampler) in one Ray actor, one per GPU or per CPU slot."""

from __future__ import annotations

import logging
import os
import time
import zlib
from typing import NamedTuple, TypeVar

import msgspec
import numpy as np
import torch

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig, resolve_dtype
from sgl_ray.model_loader import WeightStream, load_hf_config, resolve_model
from sgl_ray.parallel import ParallelLayout, free_port, init_shard_context, node_ip
from sgl_ray.runner.memory import KVCapacity
from sgl_ray.runner.model_runner import ModelRunner, PendingStep, RunnerInfo
from sgl_ray.runner.trace import gpu_idle_fraction
from sgl_ray.scheduler.plan import StepDrafts, StepOutput, StepPlan

logger = logging.getLogger(__name__)

_S = TypeVar("_S", bound=msgspec.Struct)


def owned(msg: _S) -> _S:
    """``msg`` with every numpy field read from a compiled-graph channel copied out of it (None passes through).

    Ray deserializes arrays from a channel's shared-memory buffer without copying, and the buffer stays taken
    while any of them lives. A channel has ``max_inflight_executions`` (10) buffers, used in turn, so the writer of
    the message that next comes round to a kept one waits for good: a step output or plan that its receiver keeps
    a while (the handle of the last deferred step, a plan waiting for its masks) deadlocks the group ten calls
    later. Both sides copy what they read instead (a call's deferred masks are unpacked into a new array at once).
    The arrays are small: a constrained batch's mask, the largest, is 4 bytes per 32 vocabulary tokens per
    sampled row. Arrays already owned (writeable: built in this process) are left as they are."""
    if msg is None:
        return msg
    copies = {
        name: value.copy()
        for name in msg.__struct_fields__
        if isinstance(value := getattr(msg, name), np.ndarray) and not value.flags.writeable
    }
    return msgspec.structs.replace(msg, **copies) if copies else msg


class DeferredMasks(msgspec.Struct, frozen=True):
    """The token masks of a step launched with ``mask_deferred``, sent to the shards with the call after it.

    Only the rows of constrained requests travel, still packed (int32, one bit per token): in a mixed batch the
    other rows allow every token. ``shape`` is None when the step turned out to need no mask at all (its
    constrained requests ended meanwhile), so the shards sample exactly as they would have with the mask in the
    plan."""

    step_id: int
    shape: tuple[int, int] | None  # [S sampled rows, ceil(vocab / 32) words]
    rows: np.ndarray  # [R] int64: the sampled rows that do not allow every token
    bits: np.ndarray  # [R, words] int32: their masks

    @classmethod
    def pack(cls, step_id: int, mask: np.ndarray | None) -> DeferredMasks:
        if mask is None:
            return cls(step_id, None, np.zeros(0, np.int64), np.zeros((0, 0), np.int32))
        rows = np.flatnonzero((mask != -1).any(axis=1))
        return cls(step_id, (mask.shape[0], mask.shape[1]), rows, mask[rows])

    def unpack(self) -> np.ndarray | None:
        """The [S, words] int32 mask (or None), as the scheduler built it."""
        if self.shape is None:
            return None
        mask = np.full(self.shape, -1, dtype=np.int32)
        mask[self.rows] = self.bits
        return mask


class ShardCall(msgspec.Struct, frozen=True):
    """One call of a lagged group's compiled graph (see :mod:`sgl_ray.actors.shard_group`): sample the step
    waiting for ``masks`` (launched by the previous call), then launch ``plan`` (None: launch nothing, a flush)."""

    plan: StepPlan | None = None
    masks: DeferredMasks | None = None


class LaggedReply(NamedTuple):
    """What :meth:`ShardWorker.step` answers: the output of the step launched by the *previous* call (None when
    nothing was pending, and always on ranks other than the output rank), and the seconds spent in this call (for
    control-path accounting); with ``drafts``, what the runner's drafter proposed for the plan this call launched
    with ``drafts_deferred`` (its masks come with the next call)."""

    output: StepOutput | None
    call_s: float
    drafts: StepDrafts | None = None


class ShardWorker:
    """Lifecycle: ``rendezvous_address`` (rank 0 only) → ``setup`` on every rank (joins the torch.distributed
    group, loads weights, proposes a KV capacity) → ``init_memory`` with the group's agreed capacity →
    ``execute`` once per step, or ``step`` once per step with overlap scheduling (a :class:`ShardCall`).

    Example (what :class:`~sgl_ray.actors.shard_group.ShardGroup` does)::

        >>> worker = ray.remote(ShardWorker).remote(rank=0, layout=ParallelLayout())  # doctest: +SKIP
    """

    def __init__(self, rank: int, layout: ParallelLayout) -> None:
        self.rank = rank
        self.layout = layout
        self.runner: ModelRunner | None = None
        self._pending: PendingStep | None = None  # launched by the last ``step`` call (or waiting for masks)
        self._digest = 0  # see output_digest

    def _record(self, out: StepOutput) -> StepOutput:
        """Fold a step's sampled tokens and emitted counts into this shard's running digest."""
        digest = zlib.crc32(np.ascontiguousarray(out.next_token_ids).tobytes(), self._digest)
        if out.spec_emitted is not None:
            digest = zlib.crc32(np.ascontiguousarray(out.spec_emitted).tobytes(), digest)
        self._digest = digest
        return out

    def rendezvous_address(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def setup(self, args: EngineArgs, master: tuple[str, int]) -> KVCapacity:
        device = args.torch_device()
        if device.type == "cuda":
            device = torch.device("cuda", 0)  # Ray exposes this actor's GPU as device 0
            args = args.replace(device="cuda:0")
        elif args.num_threads is None:
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        shard = init_shard_context(self.layout, self.rank, master[0], master[1], device)
        source = resolve_model(args.model_path, revision=args.revision, weights=args.load_format != "dummy")
        hf_config = load_hf_config(source)
        config = ModelConfig(hf_config, resolve_dtype(args.dtype, hf_config, device), args.context_length)
        self.runner = ModelRunner(args, config, WeightStream(source), shard=shard, allocate=False)
        return self.runner.plan_capacity()

    def init_memory(self, capacity: KVCapacity) -> RunnerInfo:
        assert self.runner is not None
        return self.runner.init_memory(capacity)

    def execute(self, msg: StepPlan | DeferredMasks) -> StepOutput | StepDrafts | None:
        """Run one step; only the output rank answers with its output (the others' would travel for nothing).

        A plan with ``drafts_deferred`` (speculative decoding under a grammar, drafts from the runner's drafter)
        runs its drafts and forward pass and answers with the drafts; the next call brings the masks built from
        them (:class:`DeferredMasks`), and the step is sampled under them and answered as usual."""
        assert self.runner is not None
        if isinstance(msg, DeferredMasks):
            pending, self._pending = self._pending, None
            assert pending is not None and pending.awaits_mask and pending.step_id == msg.step_id, (
                f"masks for step {msg.step_id}, but no step waits for them"
            )
            out = self._record(self.runner.collect(self.runner.sample_deferred(pending, msg.unpack())))
        else:
            pending = self.runner.launch(owned(msg))
            if pending.awaits_mask:
                self._pending = pending
                return pending.drafts if self.rank == self.layout.output_rank else None
            out = self._record(self.runner.collect(pending))
        return out if self.rank == self.layout.output_rank else None

    def step(self, call: ShardCall) -> LaggedReply:
        """Overlap scheduling: launch ``call.plan`` (None: launch nothing, a flush), *then* wait for the step
        launched by the previous call and answer its output. The device so has the next step queued before this
        shard blocks on the current one's results, and the plan of the step after travels while that step runs.
        Every rank of a group gets the same calls and reads ``FUTURE_TOKEN`` inputs from its own last sampled
        tokens (ranks sample identically).

        A step launched with ``mask_deferred`` has run its forward pass but not sampled: the next call brings its
        masks, and it is sampled under them first, before anything launched after it reads its tokens. With
        ``drafts_deferred`` too, this call's answer carries the drafts those masks are built from."""
        assert self.runner is not None
        t0 = time.perf_counter()
        if call.masks is not None:
            pending = self._pending
            assert pending is not None and pending.awaits_mask and pending.step_id == call.masks.step_id, (
                f"masks for step {call.masks.step_id}, but no step in flight waits for them"
            )
            self._pending = self.runner.sample_deferred(pending, call.masks.unpack())
        plan = owned(call.plan)
        launched = self.runner.launch(plan) if plan is not None else None
        previous, self._pending = self._pending, launched
        output = self._record(self.runner.collect(previous)) if previous is not None else None
        if self.rank != self.layout.output_rank:  # only the output rank's answer is read
            return LaggedReply(None, time.perf_counter() - t0)
        drafts = launched.drafts if launched is not None else None
        return LaggedReply(output, time.perf_counter() - t0, drafts)

    def start_step_trace(self) -> None:
        """Record the device time span of every step from now on (CUDA only; see ``gpu_idle_fraction``)."""
        assert self.runner is not None
        self.runner.step_trace = []

    def stop_step_trace(self, batch_size: int | None = None, skip: int = 0) -> float | None:
        """Stop recording; the device's idle share between the recorded steps of ``batch_size`` rows (all steps
        when None) after the first ``skip`` of them. None on a CPU, which records nothing (absent, not zero)."""
        assert self.runner is not None
        trace, self.runner.step_trace = self.runner.step_trace or [], None
        if self.runner.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        steps = [s for s in trace if batch_size is None or s.batch_size == batch_size][skip:]
        return gpu_idle_fraction(steps) if len(steps) >= 2 else None

    def expert_load(self) -> dict[str, list[int]] | None:
        """MoE models: tokens routed to each expert per sparse layer of this shard's stage (see
        ``ModelRunner.expert_load``); None for a dense model."""
        assert self.runner is not None
        return self.runner.expert_load()

    def output_digest(self) -> int:
        """A running CRC-32 of every step's sampled tokens and speculative emitted counts on this shard. Only the
        output rank answers the scheduler; ranks that sample (and verify drafts) identically, as the tensor-parallel
        group must, report the same digest."""
        return self._digest

    def ping(self) -> int:
        return self.rank
