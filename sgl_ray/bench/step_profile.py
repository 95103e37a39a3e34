"""``sgl-ray bench step-profile``: where the device time of one decode step goes, kernel by kernel (CUDA).

The engine's captured decode graph for ``batch_size`` requests at ``context`` tokens each is replayed directly
(no scheduler, no sampler): first timed with CUDA events, then under the profiler. Kernels of consecutive
steps overlap where they launch with programmatic dependent launch, so summed kernel durations overstate the
step; instead each kernel is charged the time by which it moves the end of the device's busy span (the
"frontier"), and what the frontier does not cover is idle time. The charges add up to the step time.

The context's KV slots are a random permutation of the pool, as in a pool that has been in use for a while.
The floor is the roofline's (:mod:`sgl_ray.bench.roofline`): weights and KV read once, at the copy bandwidth
measured in the same run.

Example (on a GPU, with a config-only model directory and random weights)::

    sgl-ray bench step-profile --model-path /tmp/llama8b --load-format dummy --skip-tokenizer-init \\
        --dtype bfloat16 --batch-size 1 --context 384
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from sgl_ray.bench.roofline import DeviceRates, ModelCost, decode_step_s, format_fraction, measure_device
from sgl_ray.configs.engine_args import EngineArgs


@dataclass(frozen=True)
class KernelSpan:
    label: str
    start_us: float
    end_us: float


@dataclass(frozen=True)
class KernelShare:
    label: str
    count: int  # launches over the profiled steps
    charged_us: float  # time by which these kernels moved the busy span's end
    duration_us: float  # their summed durations (overlapping ones counted in full)


@dataclass(frozen=True)
class Attribution:
    shares: list[KernelShare]  # most charged first
    idle_us: float  # gaps in the busy span
    window_us: float  # first kernel's start to last kernel's end


def attribute(spans: Iterable[KernelSpan]) -> Attribution:
    """Charge each kernel the time by which it extends the busy span, in order of start time; the charges and
    the idle gaps add up to the window."""
    ordered = sorted(spans, key=lambda s: (s.start_us, s.end_us))
    if not ordered:
        return Attribution([], 0.0, 0.0)
    totals: dict[str, list[float]] = {}
    frontier = ordered[0].start_us
    idle = 0.0
    for span in ordered:
        idle += max(0.0, span.start_us - frontier)
        charged = max(0.0, span.end_us - max(span.start_us, frontier))
        frontier = max(frontier, span.end_us)
        entry = totals.setdefault(span.label, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += charged
        entry[2] += span.end_us - span.start_us
    shares = [KernelShare(label, int(c), ch, d) for label, (c, ch, d) in totals.items()]
    shares.sort(key=lambda s: -s.charged_us)
    return Attribution(shares, idle, frontier - ordered[0].start_us)


_TEMPLATE = re.compile(r"<[^<>]*>")


def kernel_label(name: str, grid: Iterable[int] | None = None) -> str:
    """A short, stable name: the function name without namespaces, template arguments and parameters, then
    the launch grid (which tells apart the same kernel on different shapes)."""
    short = name.removeprefix("void ").strip()
    while _TEMPLATE.search(short):  # innermost template arguments first
        short = _TEMPLATE.sub("", short)
    short = short.split("(", 1)[0].rsplit("::", 1)[-1].strip() or name[:40]
    if grid:
        short += " [" + "x".join(str(int(g)) for g in grid) + "]"
    return short


def read_trace(path: str) -> list[KernelSpan]:
    """Kernels, copies and memsets of a Chrome trace written by ``torch.profiler`` (device timestamps, µs)."""
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    spans = []
    for ev in events:
        cat = ev.get("cat", "")
        if ev.get("ph") != "X" or cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        grid = ev.get("args", {}).get("grid") if cat == "kernel" else None
        label = kernel_label(ev.get("name", "?"), grid) if cat == "kernel" else ev.get("name", cat)
        start = float(ev["ts"])
        spans.append(KernelSpan(label, start, start + float(ev.get("dur", 0.0))))
    return spans


@dataclass
class StepProfile:
    batch_size: int
    context: int
    replays: int
    step_ms: float  # CUDA events over the timed replays
    floor_ms: float
    rates: DeviceRates
    attribution: Attribution  # over ``profiled`` replays
    profiled: int

    @property
    def fraction(self) -> float:
        return self.floor_ms / self.step_ms


def profile_decode_step(
    runner, batch_size: int, context: int, replays: int = 50, profiled: int = 10, seed: int = 0
) -> StepProfile:
    """Time and profile the decode graph of an idle :class:`~sgl_ray.runner.model_runner.ModelRunner`. Uses
    request slots ``0 .. batch_size-1`` and writes their rows of the request table (the scheduler rewrites a
    row whenever it admits a request)."""
    graphs = runner.cuda_graphs
    if graphs is None:
        raise ValueError(
            "step-profile replays the decode CUDA graphs: run on CUDA without --disable-cuda-graph"
        )
    if not graphs.can_run(batch_size):
        raise ValueError(f"no decode graph for batch size {batch_size} (largest: {graphs.max_bs})")
    info = runner.info
    if batch_size > info.max_reqs or context > info.context_length or batch_size * context >= info.num_slots:
        raise ValueError(
            f"{batch_size} requests x {context} tokens do not fit: {info.max_reqs} request slots, "
            f"{info.num_slots} KV slots, context length {info.context_length}"
        )
    g = torch.Generator().manual_seed(seed)
    slots = (torch.randperm(info.num_slots - 1, generator=g)[: batch_size * context] + 1).view(
        batch_size, context
    )
    table = runner.req_table.table
    table[:batch_size, :context] = slots.to(table.device, table.dtype)
    step = {
        "input_ids": np.ones(batch_size, dtype=np.int64),
        "positions": np.full(batch_size, context - 1, dtype=np.int64),
        "out_cache_loc": slots[:, -1].numpy().astype(np.int64),
        "req_pool_idxs": np.arange(batch_size, dtype=np.int64),
    }
    device = runner.device

    def run(n: int) -> None:
        for _ in range(n):
            graphs.replay(**step)

    rates = measure_device(device, runner.config.dtype)
    with torch.inference_mode():
        run(3)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(replays)
        end.record()
        end.synchronize()
        step_ms = start.elapsed_time(end) / replays
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(profiled)
            torch.cuda.synchronize(device)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        attribution = attribute(read_trace(path))
    finally:
        os.unlink(path)
    floor_ms = decode_step_s(ModelCost.from_config(runner.config), rates, batch_size, context) * 1e3
    return StepProfile(batch_size, context, replays, step_ms, floor_ms, rates, attribution, profiled)


def format_profile(p: StepProfile, top: int = 30) -> str:
    a = p.attribution
    per = 1.0 / max(p.profiled, 1)
    lines = [
        f"decode step, batch {p.batch_size} x context {p.context}: {p.step_ms:.3f} ms per step "
        f"({p.replays} replays); floor {p.floor_ms:.3f} ms at {p.rates.copy_bytes_per_s / 1e9:.0f} GB/s "
        f"-> {format_fraction(p.fraction)} of the floor",
        f"profiled {p.profiled} steps: {a.window_us * per:.1f} µs per step, of which idle {a.idle_us * per:.1f} µs",
        f"{'kernel [grid]':<58} {'per step':>8} {'µs/step':>9} {'share':>6} {'µs each':>8}",
    ]
    window = a.window_us or 1.0
    for s in a.shares[:top]:
        lines.append(
            f"{s.label[:58]:<58} {s.count * per:>8.1f} {s.charged_us * per:>9.1f} {s.charged_us / window:>6.1%} "
            f"{s.duration_us / max(s.count, 1):>8.2f}"
        )
    rest = a.shares[top:]
    if rest:
        lines.append(
            f"{f'({len(rest)} more)':<58} {sum(s.count for s in rest) * per:>8.1f} "
            f"{sum(s.charged_us for s in rest) * per:>9.1f} {sum(s.charged_us for s in rest) / window:>6.1%}"
        )
    return "\n".join(lines)


def run_step_profile(
    args: EngineArgs, batch_size: int, context: int, replays: int, profiled: int
) -> StepProfile:
    """Start an in-process engine on ``args`` (CUDA), profile its decode step, shut it down."""
    from sgl_ray.entrypoints.engine import Engine

    if args.uses_ray:
        raise ValueError("step-profile runs the in-process engine on one device (no Ray, no parallelism)")
    engine = Engine(**dataclasses.asdict(args))
    try:
        runner = getattr(engine._core, "runner", None)
        if runner is None or runner.device.type != "cuda":
            raise ValueError("step-profile needs the in-process engine on a CUDA device")
        return profile_decode_step(runner, batch_size, context, replays, profiled)
    finally:
        engine.shutdown()
