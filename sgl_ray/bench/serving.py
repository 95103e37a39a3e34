"""Online serving benchmark (in the spirit of ``sglang.bench_serving``): stream requests to a running server and
time each one from the client.

Requests (:mod:`sgl_ray.bench.datasets`) arrive as a Poisson process at ``request_rate`` per second (``inf``: all at
once), at most ``max_concurrency`` in flight; each asks for exactly its ``output_len`` tokens (``ignore_eos``,
``max_tokens`` = ``min_tokens``, greedy). Per request:

- TTFT: send → the first chunk carrying generated content (non-empty text for the OpenAI backends; a grown
  ``completion_tokens`` for ``/generate``, whose text may be cumulative as in SGLang). A request that streamed no
  content at all (e.g. only special tokens) gets TTFT = E2E.
- ITL: the gaps between successive content chunks; TPOT: (E2E − TTFT) / (output tokens − 1).
- output/prompt/cached tokens: the server's usage (``stream_options.include_usage``; ``meta_info`` of
  ``/generate``), else the content chunks and the dataset's prompt length.

Throughputs divide by the wall time from the first arrival to the last completion; latencies cover successful
requests only. Example (against a server on port 8000)::

    >>> from sgl_ray.bench.datasets import DatasetConfig
    >>> from sgl_ray.bench.serving import ServingConfig, run_serving_benchmark
    >>> cfg = ServingConfig("http://127.0.0.1:8000", dataset=DatasetConfig("random", num_prompts=8, input_len=64))
    >>> result = run_serving_benchmark(cfg)  # doctest: +SKIP
    >>> result.metrics.completed, result.metrics.ttft.p50_ms > 0  # doctest: +SKIP
    (8, True)
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from sgl_ray.bench.datasets import BenchRequest, DatasetConfig, load_bench_tokenizer, make_requests
from sgl_ray.bench.report import machine_info

if TYPE_CHECKING:
    import aiohttp


@dataclass(frozen=True)
class ServingConfig:
    """Where to send, how (``backend``: a key of :data:`BACKENDS`), what (``dataset``) and how fast."""

    base_url: str
    backend: str = "openai-chat"
    model: str | None = None  # None: the first of GET /v1/models (OpenAI backends)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    request_rate: float = math.inf
    max_concurrency: int | None = None
    api_key: str | None = None
    tokenizer: str | None = None  # None: the embedded default model's
    flush_cache: bool = False  # POST /flush_cache before the timed run (sgl_ray and SGLang servers)
    warmup: bool = True
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {sorted(BACKENDS)}")
        if not self.request_rate > 0 or (self.max_concurrency is not None and self.max_concurrency < 1):
            raise ValueError("request_rate must be > 0 and max_concurrency >= 1")

    def url(self, path: str) -> str:
        """``base_url`` (a trailing ``/`` or ``/v1`` dropped) + ``path``."""
        return self.base_url.rstrip("/").removesuffix("/v1") + path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


# --- backends -------------------------------------------------------------------------------------------------------
class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None


class Delta(NamedTuple):
    """One SSE event: whether it carried generated content, and the cumulative usage when it reports one."""

    content: bool
    usage: Usage | None


class Backend(ABC):
    """One server API. Contract: :meth:`payload` is the JSON body of a *streamed* request for exactly
    ``req.output_len`` greedy tokens; :meth:`parse` reads one decoded ``data:`` event (``prev``: the last usage
    seen in this stream)."""

    path: str
    needs_model = True

    @abstractmethod
    def payload(self, req: BenchRequest, model: str | None) -> dict[str, Any]: ...

    @abstractmethod
    def parse(self, event: dict[str, Any], prev: Usage | None) -> Delta: ...


_OPENAI_FIXED = {
    "temperature": 0.0,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def _openai_usage(event: dict[str, Any]) -> Usage | None:
    u = event.get("usage")
    if not u:
        return None
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    return Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0), cached)


class OpenAI(Backend):
    """``/v1/chat/completions`` (``chat``: the prompt as system + user messages) or ``/v1/completions``; the
    SGLang/vLLM extras (``ignore_eos``, ``min_tokens``) go straight into the body, as openai's ``extra_body``."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.path = "/v1/chat/completions" if chat else "/v1/completions"

    def payload(self, req: BenchRequest, model: str | None) -> dict[str, Any]:
        prompt = {"messages": req.messages()} if self.chat else {"prompt": req.text}
        n = req.output_len
        return {"model": model, **prompt, "max_tokens": n, "min_tokens": n, **_OPENAI_FIXED}

    def parse(self, event: dict[str, Any], prev: Usage | None) -> Delta:
        choice = (event.get("choices") or [{}])[0]
        text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
        return Delta(bool(text), _openai_usage(event))


class SGLangGenerate(Backend):
    path = "/generate"
    needs_model = False

    def payload(self, req: BenchRequest, model: str | None) -> dict[str, Any]:
        n = req.output_len
        params = {"max_new_tokens": n, "min_new_tokens": n, "ignore_eos": True, "temperature": 0.0}
        return {"text": req.text, "sampling_params": params, "stream": True}

    def parse(self, event: dict[str, Any], prev: Usage | None) -> Delta:
        meta = event.get("meta_info") or {}
        usage = Usage(
            meta.get("prompt_tokens", 0), meta.get("completion_tokens", 0), meta.get("cached_tokens")
        )
        return Delta(usage.completion_tokens > (prev.completion_tokens if prev else 0), usage)


BACKENDS: dict[str, Backend] = {
    "openai-chat": OpenAI(chat=True),
    "openai-completions": OpenAI(chat=False),
    "sglang-generate": SGLangGenerate(),
}


# --- results --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestMetrics:
    """One request as the client saw it (times in seconds)."""

    success: bool
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int | None
    ttft_s: float
    e2e_s: float
    itl_s: tuple[float, ...] = ()
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


class LatencyStats(NamedTuple):
    """Mean and percentiles of one latency in milliseconds (None without samples)."""

    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        if not seconds:
            return cls(None, None, None, None)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(float(ms.mean()), *(float(p) for p in np.percentile(ms, [50, 90, 99])))


@dataclass(frozen=True)
class ServingMetrics:
    """The aggregates of a run (successful requests only, except ``failed``)."""

    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cache_hit_rate: float | None  # cached / prompt tokens; None when the server reports no cached tokens
    request_throughput: float
    input_throughput: float
    output_throughput: float
    ttft: LatencyStats
    itl: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats

    @classmethod
    def of(cls, requests: Sequence[RequestMetrics], duration_s: float) -> ServingMetrics:
        ok = [r for r in requests if r.success]
        inp, out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
        cached = sum(r.cached_tokens or 0 for r in ok)
        reported = inp > 0 and any(r.cached_tokens is not None for r in ok)
        return cls(
            len(ok), len(requests) - len(ok), inp, out, cached, cached / inp if reported else None,
            len(ok) / duration_s, inp / duration_s, out / duration_s,
            ttft=LatencyStats.of([r.ttft_s for r in ok]),
            itl=LatencyStats.of([g for r in ok for g in r.itl_s]),
            tpot=LatencyStats.of([t for r in ok if (t := r.tpot_s) is not None]),
            e2e=LatencyStats.of([r.e2e_s for r in ok]),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {k: v._asdict() if isinstance(v, LatencyStats) else v for k, v in vars(self).items()}


@dataclass(frozen=True)
class ServingResult:
    """A finished run: its config, the model asked for, every request's metrics, the wall time, the aggregates."""

    config: ServingConfig
    model: str | None
    requests: tuple[RequestMetrics, ...]
    duration_s: float
    date: str = field(
        default_factory=lambda: datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    )

    @cached_property
    def metrics(self) -> ServingMetrics:
        return ServingMetrics.of(self.requests, self.duration_s)

    def to_record(self) -> dict[str, Any]:
        """The JSONL record: date, server, backend, workload, all metrics and the machine the client ran on."""
        cfg, rate = self.config, self.config.request_rate
        return {
            "date": self.date,
            "bench": "serving",
            "base_url": cfg.base_url,
            "backend": cfg.backend,
            "model": self.model,
            "request_rate": rate if math.isfinite(rate) else "inf",
            "max_concurrency": cfg.max_concurrency,
            "params": cfg.dataset.params(),
            "duration_s": self.duration_s,
            **self.metrics.to_dict(),
            "errors": sorted({r.error for r in self.requests if r.error})[:5],
            "machine": machine_info(),
        }


# --- the client -----------------------------------------------------------------------------------------------------
async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


async def _send(
    session: aiohttp.ClientSession, cfg: ServingConfig, model: str | None, req: BenchRequest
) -> RequestMetrics:
    import aiohttp

    backend = BACKENDS[cfg.backend]
    usage: Usage | None = None
    ttft, itl, chunks, error = None, [], 0, None
    start = last = time.perf_counter()
    try:
        async with session.post(
            cfg.url(backend.path), json=backend.payload(req, model), headers=cfg.headers()
        ) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            async for event in _events(resp):
                if "error" in event:
                    raise ValueError(f"stream error: {event['error']}")
                delta = backend.parse(event, usage)
                usage = delta.usage or usage
                if delta.content:
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - start
                    else:
                        itl.append(now - last)
                    last, chunks = now, chunks + 1
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        error = str(e) or type(e).__name__
    e2e = time.perf_counter() - start
    if usage is None:
        usage = Usage(req.prompt_len, chunks, None)
    return RequestMetrics(
        error is None, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
        e2e if ttft is None else ttft, e2e, tuple(itl), error,
    )  # fmt: skip


async def _model(session: aiohttp.ClientSession, cfg: ServingConfig) -> str | None:
    if cfg.model or not BACKENDS[cfg.backend].needs_model:
        return cfg.model
    async with session.get(cfg.url("/v1/models"), headers=cfg.headers()) as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


async def arun_serving_benchmark(
    config: ServingConfig, requests: Sequence[BenchRequest] | None = None
) -> ServingResult:
    """:func:`run_serving_benchmark` inside a running event loop."""
    import aiohttp

    cfg = config
    if requests is None:
        requests = make_requests(cfg.dataset, load_bench_tokenizer(cfg.tokenizer))
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=2**20) as session:
        model = await _model(session, cfg)
        if cfg.warmup:
            warm = await _send(session, cfg, model, BenchRequest("Hello!", 2, min(4, cfg.dataset.output_len)))
            if not warm.success:
                raise RuntimeError(f"warm-up request to {cfg.base_url} failed: {warm.error}")
        if cfg.flush_cache:
            async with session.post(cfg.url("/flush_cache"), headers=cfg.headers()) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"POST /flush_cache answered {resp.status}: {await resp.text()}")
        sem = asyncio.Semaphore(cfg.max_concurrency or len(requests) or 1)
        rng = random.Random(f"{cfg.dataset.seed}-arrivals")

        async def limited(req: BenchRequest) -> RequestMetrics:
            async with sem:
                return await _send(session, cfg, model, req)

        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            if i and math.isfinite(cfg.request_rate):
                await asyncio.sleep(rng.expovariate(cfg.request_rate))  # Poisson arrivals
            tasks.append(asyncio.create_task(limited(req)))
        metrics = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return ServingResult(cfg, model, tuple(metrics), duration)


def run_serving_benchmark(
    config: ServingConfig, requests: Sequence[BenchRequest] | None = None
) -> ServingResult:
    """Warm up, optionally flush the server's prefix cache, then send ``requests`` (default: built from
    ``config.dataset`` with ``config.tokenizer``) as configured, and return every request's metrics. Raises
    ``RuntimeError`` if the warm-up request fails (server down, wrong model, bad API key). See the module docstring
    for the definitions and a runnable example."""
    return asyncio.run(arun_serving_benchmark(config, requests))
