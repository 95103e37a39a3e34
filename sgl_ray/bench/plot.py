"""PNG plots of serving benchmark runs: TTFT and end-to-end latency CDFs, and the throughputs, side by side.

Several runs (say, two backends or two servers measured one after the other) go on the same axes, one colour each.
Needs matplotlib (the ``test`` extra); without it :func:`plot_serving` says so and writes nothing.

Example::

    >>> from sgl_ray.bench.plot import plot_serving
    >>> plot_serving([result_a, result_b], "serving.png")  # doctest: +SKIP
    True
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sgl_ray.bench.serving import ServingResult


def _label(result: ServingResult) -> str:
    cfg = result.config
    return f"{cfg.backend} · {cfg.dataset.name}"


def plot_serving(results: Sequence[ServingResult], path: str | Path) -> bool:
    """Write ``path``: TTFT and E2E CDFs (successful requests) and a bar chart of request, input and output
    throughput per run. Returns whether it wrote (False when matplotlib is not importable)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; not writing {path}", file=sys.stderr)
        return False
    fig, (ttft_ax, e2e_ax, bar_ax) = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        ok = [m for m in r.requests if m.success]
        for ax, values in ((ttft_ax, [m.ttft_s for m in ok]), (e2e_ax, [m.e2e_s for m in ok])):
            ms = np.sort(np.asarray(values, dtype=np.float64)) * 1000.0
            cdf = np.arange(1, len(ms) + 1) / max(1, len(ms))
            ax.step(ms, cdf, where="post", color=colors[i % len(colors)], label=_label(r))
    for ax, name in ((ttft_ax, "TTFT"), (e2e_ax, "end-to-end latency")):
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ttft_ax.legend(fontsize=8, loc="lower right")

    kinds = ("req/s", "input tok/s", "output tok/s")
    width = 0.8 / max(1, len(results))
    x = np.arange(len(kinds))
    for i, r in enumerate(results):
        m = r.metrics
        values = [m.request_throughput, m.input_throughput, m.output_throughput]
        bars = bar_ax.bar(x + i * width, values, width, color=colors[i % len(colors)], label=_label(r))
        bar_ax.bar_label(bars, fmt="%.1f", fontsize=7)
    bar_ax.set_xticks(x + width * (len(results) - 1) / 2, kinds)
    bar_ax.set_yscale("log")
    bar_ax.set_title("throughput (log scale)")
    bar_ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
