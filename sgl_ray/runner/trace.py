"""Device step timing: how long the GPU waited between steps (overlap scheduling's measure), and where its time
went by kind of step (the roofline benchmark's phase breakdown)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TracedStep(NamedTuple):
    batch_size: int
    num_tokens: int  # new tokens: equal to ``batch_size`` for a decode step
    start: torch.cuda.Event
    end: torch.cuda.Event


StepTrace = list[TracedStep]  # one per CUDA step (``ModelRunner.step_trace``)


def _idle_ms(trace: StepTrace) -> float:
    """Milliseconds the device waited between consecutive steps (events synchronized)."""
    return sum(max(0.0, a.end.elapsed_time(b.start)) for a, b in zip(trace, trace[1:], strict=False))


def gpu_idle_fraction(trace: StepTrace) -> float:
    """Share of the time from the first step's start to the last step's end during which the device waited for
    the next step (events synchronized)."""
    if len(trace) < 2:
        return 0.0
    return _idle_ms(trace) / trace[0].start.elapsed_time(trace[-1].end)


def phase_times(trace: StepTrace) -> dict[str, float]:
    """Seconds of device time in decode steps (one new token per request) and in the other steps (prefill
    chunks, extends, mixed), and seconds the device waited between steps (events synchronized)."""
    decode = sum(s.start.elapsed_time(s.end) for s in trace if s.num_tokens == s.batch_size) / 1e3
    other = sum(s.start.elapsed_time(s.end) for s in trace if s.num_tokens != s.batch_size) / 1e3
    return {"decode_s": decode, "prefill_s": other, "idle_s": _idle_ms(trace) / 1e3}
