"""Benchmark results: the machine they ran on, the per-system numbers, the printed table, JSONL and a PNG plot.

Example::

    >>> from sgl_ray.bench.report import SystemResult, WorkloadResult, format_table
    >>> ours = SystemResult("sgl_ray", num_requests=1, input_tokens=128, output_tokens=64, wall_s=2.0)
    >>> hf = SystemResult("transformers", num_requests=1, input_tokens=128, output_tokens=64, wall_s=4.0)
    >>> result = WorkloadResult("bs1", {"input_len": 128, "output_len": 64}, ours, hf)
    >>> result.ratio
    2.0
    >>> format_table([result]).splitlines()[0].split()[:3]
    ['workload', '|', 'system']
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SystemResult:
    """One system's timed run of one workload. ``cached_tokens``/``num_preemptions`` are None for transformers."""

    system: str
    num_requests: int
    input_tokens: int
    output_tokens: int
    wall_s: float
    cached_tokens: int | None = None
    num_preemptions: int | None = None

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.wall_s

    @property
    def requests_s(self) -> float:
        return self.num_requests / self.wall_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(output_tok_s=self.output_tok_s, total_tok_s=self.total_tok_s, requests_s=self.requests_s)
        return d


@dataclass(frozen=True)
class WorkloadResult:
    """A workload run by sgl_ray (``ours``) and, unless skipped, by a ``baseline`` system, side by side."""

    workload: str
    params: dict[str, Any]
    ours: SystemResult
    baseline: SystemResult | None = None
    load_avg_1m: float | None = field(default_factory=lambda: _load_avg())
    """The 1-minute load average when the workload finished (this process counts: about its torch threads)."""

    @property
    def ratio(self) -> float | None:
        """Output tokens/s of ``ours`` over the baseline's (None without a baseline)."""
        return None if self.baseline is None else self.ours.output_tok_s / self.baseline.output_tok_s

    @property
    def systems(self) -> list[SystemResult]:
        return [self.ours] if self.baseline is None else [self.ours, self.baseline]


@dataclass(frozen=True)
class RunInfo:
    """What every record of one benchmark run shares: machine, model, dtype, engine options and date."""

    model: str
    dtype: str
    engine_args: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=lambda: machine_info())
    date: str = field(
        default_factory=lambda: datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    )

    def record(self, workload: str, params: dict[str, Any], **results: Any) -> dict[str, Any]:
        """One JSONL record: this run's date, model and dtype, the workload and its parameters, ``results``, then
        the engine options and the machine."""
        return {
            "date": self.date,
            "workload": workload,
            "model": self.model,
            "dtype": self.dtype,
            "params": params,
            **results,
            "engine_args": self.engine_args,
            "machine": self.machine,
        }


def _load_avg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, torch threads, GPU (if any), load average and library versions, right now.

    >>> sorted(machine_info())[:3]
    ['cpu_count', 'cpu_model', 'gpu']
    """
    import transformers

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": affinity,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m": _load_avg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def to_record(result: WorkloadResult, run: RunInfo) -> dict[str, Any]:
    """The JSON record of one workload: run info, workload parameters, per-system numbers and the ratio."""
    return {
        "date": run.date,
        "workload": result.workload,
        "model": run.model,
        "dtype": run.dtype,
        "params": result.params,
        "systems": {s.system: s.to_dict() for s in result.systems},
        "ratio": result.ratio,
        "ratio_of": None if result.baseline is None else f"{result.ours.system}/{result.baseline.system}",
        "load_avg_1m_end": result.load_avg_1m,
        "engine_args": run.engine_args,
        "machine": run.machine,
    }


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Append one JSON line per record (results of successive runs accumulate, like ``bench_serving``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


_COLUMNS = (
    "workload",
    "system",
    "requests",
    "in tok",
    "out tok",
    "wall s",
    "out tok/s",
    "total tok/s",
    "ratio",
)


def _rows(result: WorkloadResult) -> list[tuple[str, ...]]:
    rows = []
    for s in result.systems:
        if result.baseline is None:
            ratio = "-"
        elif s is result.ours:
            ratio = f"{result.ratio:.2f}x"
        else:
            ratio = "1.00x"
        rows.append(
            (
                result.workload,
                s.system,
                str(s.num_requests),
                str(s.input_tokens),
                str(s.output_tokens),
                f"{s.wall_s:.2f}",
                f"{s.output_tok_s:.1f}",
                f"{s.total_tok_s:.1f}",
                ratio,
            )
        )
    return rows


def format_table(results: list[WorkloadResult]) -> str:
    """A fixed-width ``|``-separated table, one row per (workload, system); ``ratio`` is out tok/s vs baseline."""
    rows = [row for r in results for row in _rows(r)]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(_COLUMNS)]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(_COLUMNS), sep, *(line(row) for row in rows)])


def format_header(run: RunInfo) -> str:
    """One line naming the machine, model, dtype and date of a run."""
    m = run.machine
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (
        f"{run.date} · {m['cpu_model']} ({m['usable_cores']} cores, {m['torch_threads']} torch threads{gpu}, "
        f"load {m['load_avg_1m']}) · model {run.model} · {run.dtype}"
    )


def plot(results: list[WorkloadResult], path: str | Path) -> bool:
    """Bar chart of output tokens/s per workload and system, if matplotlib is importable. Returns whether it wrote."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; not writing {path}", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        names = [s.system for s in r.systems]
        values = [s.output_tok_s for s in r.systems]
        bars = ax.bar(names, values, color=["tab:blue", "tab:gray"][: len(names)])
        ax.bar_label(bars, fmt="%.1f")
        title = r.workload if r.ratio is None else f"{r.workload} ({r.ratio:.2f}x)"
        ax.set_title(title)
        ax.set_ylabel("output tok/s")
        ax.margins(y=0.15)
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
