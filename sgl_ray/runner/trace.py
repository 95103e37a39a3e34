"""Device step timing: how long the GPU waited between steps (overlap scheduling's measure)."""

from __future__ import annotations

import torch

StepTrace = list[tuple[int, torch.cuda.Event, torch.cuda.Event]]  # (batch size, start, end) per CUDA step


def gpu_idle_fraction(trace: StepTrace) -> float:
    """Share of the time from the first step's start to the last step's end during which the device waited for
    the next step (``ModelRunner.step_trace``, events synchronized)."""
    if len(trace) < 2:
        return 0.0
    gaps = sum(
        max(0.0, end.elapsed_time(nxt)) for (_, _, end), (_, nxt, _) in zip(trace, trace[1:], strict=False)
    )
    return gaps / trace[0][1].elapsed_time(trace[-1][2])
