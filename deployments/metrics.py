"""Prometheus metrics kept by the ingress (text exposition format, no extra dependency)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(_LATENCY_BUCKETS)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(_LATENCY_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        lines += [
            f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(_LATENCY_BUCKETS, self.counts, strict=True)
        ]
        return [
            *lines,
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.total}",
            f"{name}_count {self.n}",
        ]


class Metrics:
    """Request counts, token counts, TTFT and inter-token latency, plus engine gauges at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generation_tokens = 0
        self.ttft = _Histogram()
        self.itl = _Histogram()

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def tokens(self, prompt: int, cached: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.generation_tokens += generated

    def latency(self, ttft: float | None, itls: list[float]) -> None:
        with self._lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            for v in itls:
                self.itl.observe(v)

    def render(self, engines: dict[str, Any] | list[tuple[str | None, dict[str, Any]]]) -> str:
        """The exposition text; ``engines``: one replica's engine stats, or ``(model id or None, stats)`` per model
        (the engine gauges get a ``model`` label when a model id is given)."""
        if isinstance(engines, dict):
            engines = [(None, engines)]
        with self._lock:
            lines = [
                "# HELP sgl_ray_requests_total HTTP requests by endpoint and status.",
                "# TYPE sgl_ray_requests_total counter",
            ]
            lines += [
                f'sgl_ray_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())
            ]
            for name, value, help_text in (
                ("sgl_ray_prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                (
                    "sgl_ray_cached_prompt_tokens_total",
                    self.cached_tokens,
                    "Prompt tokens served from the radix cache.",
                ),
                ("sgl_ray_generation_tokens_total", self.generation_tokens, "Tokens generated."),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
            lines += self.ttft.render("sgl_ray_time_to_first_token_seconds", "Time to first token.")
            lines += self.itl.render("sgl_ray_inter_token_latency_seconds", "Time between streamed tokens.")
            hit = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        for name, help_text, value in _GAUGES:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for model, engine in engines:
                label = f'{{model="{model}"}}' if model is not None else ""
                lines.append(f"{name}{label} {value(engine)}")
        name = "sgl_ray_radix_cache_hit_rate"
        lines += [
            f"# HELP {name} Cached prompt tokens over prompt tokens.",
            f"# TYPE {name} gauge",
            f"{name} {hit}",
        ]
        lines += _speculation(engines)
        for _, engine in engines[:1]:
            lines += _expert_tokens(engine.get("expert_tokens"))
        return "\n".join(lines) + "\n"


def _kv_usage(engine: dict[str, Any]) -> float:
    capacity = engine.get("kv_capacity") or 1
    return 1.0 - engine.get("kv_free", capacity) / capacity


# name, help, value from one replica's engine stats
_GAUGES: tuple[tuple[str, str, Callable[[dict[str, Any]], float]], ...] = (
    ("sgl_ray_num_running_requests", "Requests running (one replica).", lambda e: e.get("num_running", 0)),
    ("sgl_ray_num_waiting_requests", "Requests waiting (one replica).", lambda e: e.get("num_waiting", 0)),
    ("sgl_ray_kv_cache_usage", "Share of KV slots in use.", _kv_usage),
)


# name, the engine stat it reports, type, help: speculative decoding, one replica
_SPECULATION = (
    ("sgl_ray_spec_verify_steps_total", "spec_verify_steps", "counter", "Speculative verify steps."),
    ("sgl_ray_spec_proposed_drafts_total", "spec_proposed_drafts", "counter", "Draft tokens proposed."),
    ("sgl_ray_spec_accepted_drafts_total", "spec_accepted_drafts", "counter", "Draft tokens accepted."),
    (
        "sgl_ray_spec_accept_length",
        "spec_accept_length",
        "gauge",
        "Tokens per verify step, the bonus one included.",
    ),
)


def _speculation(engines: list[tuple[str | None, dict[str, Any]]]) -> list[str]:
    """Models with ``speculative_algorithm``: verify steps, drafts proposed and accepted, and the accept length of
    one replica (as ``get_stats()`` reports them)."""
    speculating = [(model, engine) for model, engine in engines if engine.get("spec_algorithm")]
    lines: list[str] = []
    for name, key, kind, help_text in _SPECULATION if speculating else ():
        lines += [f"# HELP {name} {help_text} (one replica)", f"# TYPE {name} {kind}"]
        for model, engine in speculating:
            label = f'{{model="{model}"}}' if model is not None else ""
            lines.append(f"{name}{label} {engine.get(key, 0)}")
    return lines


def _expert_tokens(load: dict[str, list[int]] | None) -> list[str]:
    """MoE models: tokens routed to each expert of each sparse layer (the input of expert placement)."""
    if not load:
        return []
    name = "sgl_ray_moe_expert_tokens_total"
    lines = [f"# HELP {name} Tokens routed to an expert of a sparse layer.", f"# TYPE {name} counter"]
    for layer, counts in sorted(load.items(), key=lambda kv: int(kv[0])):
        lines += [f'{name}{{layer="{layer}",expert="{e}"}} {c}' for e, c in enumerate(counts)]
    return lines
