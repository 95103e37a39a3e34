"""Offline throughput workloads, run side by side in one process (like ``sglang.bench_offline_throughput``).

Three workloads, each timed for sgl_ray's in-process :class:`~sgl_ray.Engine` and a baseline in the same run (the
machines are noisy, so only same-run numbers are compared):

- ``bs1``: one greedy request of ``input_len`` prompt tokens and ``output_len`` new tokens; baseline transformers
  ``generate`` at batch size 1.
- ``batch``: ``num_prompts`` random-token prompts (lengths uniform in ``[input_len/2, input_len]``), all submitted
  to the engine at once; baseline transformers in static left-padded batches of ``hf_batch_size``.
- ``shared-prefix``: ``num_prompts`` requests sharing a ``prefix_len``-token few-shot prefix, each with a distinct
  ~``suffix_len``-token question; baseline the same engine with the radix cache turned off.

Every request runs to exactly ``output_len`` tokens (greedy, ``ignore_eos``). The prefix cache is flushed before
each warm-up and each timed run, so no run reuses another's KV.

Example::

    >>> from sgl_ray.bench.offline import OfflineConfig, run_offline
    >>> from sgl_ray.configs.engine_args import EngineArgs
    >>> run, results = run_offline(EngineArgs(), OfflineConfig(workloads=("bs1",), output_len=16))
    >>> results[0].ours.output_tokens
    16
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

from sgl_ray.bench.hf_baseline import HFBaseline
from sgl_ray.bench.report import RunInfo, SystemResult, WorkloadResult
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.entrypoints.engine import Engine

logger = logging.getLogger(__name__)

WORKLOADS = ("bs1", "batch", "shared-prefix")
"""Workload names, in the order they run (``shared-prefix`` last: it needs a second engine)."""
OURS, HF, RADIX_OFF = "sgl_ray", "transformers", "sgl_ray-radix-off"

_FEW_SHOT = [
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("What is 7 times 8?", "56."),
    ("Which planet is known as the Red Planet?", "Mars."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare."),
    ("What gas do plants take in from the air?", "Carbon dioxide."),
    ("At what temperature does water boil at sea level?", "100 degrees Celsius."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean."),
]
_WARM_UP_LEN = 8


@dataclass(frozen=True)
class OfflineConfig:
    """Workload sizes. ``None`` picks the per-workload default (see :meth:`num_prompts_for`, :meth:`output_len_for`)."""

    workloads: tuple[str, ...] = WORKLOADS
    input_len: int = 128
    output_len: int | None = None
    num_prompts: int | None = None
    prefix_len: int = 1000
    suffix_len: int = 32
    hf_batch_size: int = 16
    seed: int = 0
    skip_hf: bool = False

    def __post_init__(self) -> None:
        if unknown := set(self.workloads) - set(WORKLOADS):
            raise ValueError(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
        sizes = {"input_len": self.input_len, "prefix_len": self.prefix_len, "suffix_len": self.suffix_len}
        sizes.update(hf_batch_size=self.hf_batch_size, output_len=self.output_len or 1)
        sizes.update(num_prompts=self.num_prompts or 1)
        if bad := [k for k, v in sizes.items() if v < 1]:
            raise ValueError(f"{', '.join(bad)} must be >= 1")

    def output_len_for(self, workload: str) -> int:
        return self.output_len or (16 if workload == "shared-prefix" else 64)

    def num_prompts_for(self, workload: str) -> int:
        if workload == "bs1":
            return 1
        return self.num_prompts or (64 if workload == "shared-prefix" else 32)


@dataclass(frozen=True)
class Workload:
    """Token-id prompts, the number of new tokens each request makes, and the parameters that produced them."""

    name: str
    prompts: list[list[int]]
    output_len: int
    params: dict[str, Any]


# --- prompts -------------------------------------------------------------------------------------------------------
def _token_pool(engine: Engine) -> list[int]:
    """Ids random prompts draw from: the model's vocabulary less the tokenizer's special tokens."""
    vocab = engine.model_config.vocab_size
    tok = engine.tokenizer
    if tok is None:
        return list(range(vocab))
    special = set(tok.all_special_ids)
    return [i for i in range(min(vocab, len(tok))) if i not in special]


def _shared_prefix(engine: Engine, cfg: OfflineConfig, pool: list[int], rng: random.Random):
    """``prefix_len`` few-shot tokens and ``num_prompts`` distinct suffixes of about ``suffix_len`` tokens."""
    n = cfg.num_prompts_for("shared-prefix")
    tok = engine.tokenizer
    if tok is None:
        prefix = rng.choices(pool, k=cfg.prefix_len)
        return prefix, [rng.choices(pool, k=cfg.suffix_len) for _ in range(n)]
    text = "Answer each question briefly and correctly.\n\n"
    prefix: list[int] = []
    while len(prefix) < cfg.prefix_len:  # repeat the examples until the prefix is long enough
        text += "".join(f"Q: {q}\nA: {a}\n\n" for q, a in _FEW_SHOT)
        prefix = tok.encode(text, add_special_tokens=False)
    cue = tok.encode("\nA:", add_special_tokens=False)
    suffixes = []
    for i in range(n):
        question = (
            f"Q: Problem {i}. A train leaves station {i % 7} at {i % 12 + 1} o'clock and travels at {20 + i} km "
            f"per hour for {i % 5 + 2} hours. How far from station {i % 7} is it then?"
        )
        ids = tok.encode(question, add_special_tokens=False)[: max(1, cfg.suffix_len - len(cue))]
        suffixes.append(ids + cue)
    return prefix[: cfg.prefix_len], suffixes


def make_workload(name: str, cfg: OfflineConfig, engine: Engine) -> Workload:
    """Build a workload's prompts deterministically from ``cfg.seed`` (independent of which others run)."""
    rng = random.Random(f"{cfg.seed}-{name}")
    pool = _token_pool(engine)
    out = cfg.output_len_for(name)
    n = cfg.num_prompts_for(name)
    params: dict[str, Any] = {"num_prompts": n, "output_len": out, "seed": cfg.seed}
    if name == "bs1":
        prompts = [rng.choices(pool, k=cfg.input_len)]
        params.update(input_len=cfg.input_len)
    elif name == "batch":
        low = max(1, cfg.input_len // 2)
        prompts = [rng.choices(pool, k=rng.randint(low, cfg.input_len)) for _ in range(n)]
        params.update(input_len=cfg.input_len, input_len_min=low, hf_batch_size=cfg.hf_batch_size)
    else:
        prefix, suffixes = _shared_prefix(engine, cfg, pool, rng)
        prompts = [prefix + s for s in suffixes]
        params.update(
            prefix_len=len(prefix), suffix_len=cfg.suffix_len, prefix_text=engine.tokenizer is not None
        )
    return Workload(name, prompts, out, params)


# --- timed runs ----------------------------------------------------------------------------------------------------
def _flush(engine: Engine) -> None:
    if not engine.flush_cache():
        logger.warning("flush_cache refused (requests still running); the next run may reuse cached KV")


def run_engine(engine: Engine, system: str, wl: Workload, lora_path: list[str] | None = None) -> SystemResult:
    """Warm up, flush the prefix cache, then time all of ``wl``'s prompts submitted in one ``generate`` call
    (``lora_path``: each prompt's LoRA adapter)."""
    params = {"temperature": 0.0, "max_new_tokens": wl.output_len, "ignore_eos": True}
    _flush(engine)
    engine.generate(input_ids=[wl.prompts[0][:_WARM_UP_LEN]], sampling_params={**params, "max_new_tokens": 4})
    _flush(engine)
    preemptions = engine.get_stats()["num_preemptions"]
    start = time.perf_counter()
    outs = engine.generate(input_ids=wl.prompts, sampling_params=params, lora_path=lora_path)
    wall = time.perf_counter() - start
    assert isinstance(outs, list)
    return SystemResult(
        system=system,
        num_requests=len(wl.prompts),
        input_tokens=sum(o["meta_info"]["prompt_tokens"] for o in outs),
        output_tokens=sum(len(o["output_ids"]) for o in outs),
        wall_s=wall,
        cached_tokens=sum(o["meta_info"]["cached_tokens"] for o in outs),
        num_preemptions=engine.get_stats()["num_preemptions"] - preemptions,
    )


def _log(result: SystemResult, workload: str) -> None:
    print(
        f"[bench] {workload:<13} {result.system:<18} {result.output_tokens:>6} out tok in {result.wall_s:7.2f} s"
        f" = {result.output_tok_s:8.1f} tok/s",
        file=sys.stderr,
        flush=True,
    )


def run_offline(engine_args: EngineArgs, cfg: OfflineConfig) -> tuple[RunInfo, list[WorkloadResult]]:
    """Run ``cfg.workloads`` for sgl_ray and its baselines; returns the run info and one result per workload."""
    selected = [w for w in WORKLOADS if w in cfg.workloads]
    engine = Engine(**dataclasses.asdict(engine_args))
    radix_on: SystemResult | None = None
    try:
        run = RunInfo(
            model=engine.model_path,
            dtype=str(engine.model_config.dtype).removeprefix("torch."),
            engine_args=dataclasses.asdict(engine_args),
        )
        workloads = {name: make_workload(name, cfg, engine) for name in selected}
        results = _against_hf(engine, engine_args, cfg, workloads)
        if "shared-prefix" in workloads and not engine_args.disable_radix_cache:
            radix_on = run_engine(engine, OURS, workloads["shared-prefix"])
            _log(radix_on, "shared-prefix")
    finally:
        engine.shutdown()
    del engine  # one engine's KV pool at a time
    gc.collect()
    if "shared-prefix" in workloads:
        results.append(_shared_prefix_run(engine_args, workloads["shared-prefix"], radix_on))
    return run, results


def _against_hf(
    engine: Engine, engine_args: EngineArgs, cfg: OfflineConfig, workloads: dict[str, Workload]
) -> list[WorkloadResult]:
    """``bs1`` and ``batch``: each timed on the engine, then right after on transformers (unless skipped)."""
    names = [n for n in ("bs1", "batch") if n in workloads]
    hf: HFBaseline | None = None
    if names and not cfg.skip_hf:
        print("[bench] loading the transformers baseline", file=sys.stderr, flush=True)
        device = engine_args.torch_device()
        hf = HFBaseline.load(engine.model_path, engine_args.revision, engine.model_config.dtype, device)
    results = []
    for name in names:
        wl = workloads[name]
        ours = run_engine(engine, OURS, wl)
        _log(ours, name)
        base = None
        if hf is not None:
            hf.warm_up()
            base = hf.run(HF, wl.prompts, wl.output_len, batch_size=1 if name == "bs1" else cfg.hf_batch_size)
            _log(base, name)
        results.append(WorkloadResult(name, wl.params, ours, base))
    return results


def _run_fresh(engine_args: EngineArgs, system: str, wl: Workload) -> SystemResult:
    """Build an engine, time ``wl`` on it, shut it down (its KV pool is freed when this returns)."""
    with Engine(**dataclasses.asdict(engine_args)) as engine:
        return run_engine(engine, system, wl)


def _shared_prefix_run(
    engine_args: EngineArgs, wl: Workload, radix_on: SystemResult | None
) -> WorkloadResult:
    """Radix cache on (already measured on the main engine, unless it was built with the cache off), then off."""
    if radix_on is None:
        radix_on = _run_fresh(engine_args.replace(disable_radix_cache=False), OURS, wl)
        _log(radix_on, wl.name)
        gc.collect()
    base = _run_fresh(engine_args.replace(disable_radix_cache=True), RADIX_OFF, wl)
    _log(base, wl.name)
    return WorkloadResult(wl.name, wl.params, radix_on, base)
