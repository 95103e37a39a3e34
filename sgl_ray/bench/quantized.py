"""``sgl-ray bench gguf-quantized``: a GGUF model kept quantized (``quantization="gguf"``) vs dequantized at load
(``quantization="none"``), side by side in one run.

- memory: each mode starts in a fresh process, which reports its RSS before and after the engine starts and
  ``get_stats()["weight_bytes"]``;
- tokens: the greedy tokens of a few chat prompts in both modes, which must be equal;
- speed: both engines in this process, timed in alternating rounds (the machines are noisy): one request (bs1)
  and ``--batch-size`` requests at once, ``--output-len`` new tokens each; the best round of each is reported.

Example::

    sgl-ray bench gguf-quantized                       # the embedded SmolLM2 Q4_1 GGUF, CPU
    sgl-ray bench gguf-quantized --output-len 64 --rounds 5 --batch-size 8 --num-threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from sgl_ray.bench.report import RunInfo, format_header, write_jsonl
from sgl_ray.configs.engine_args import EngineArgs

MODES = ("none", "gguf")
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
)


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, where /proc is missing


@dataclass(frozen=True)
class ModeResult:
    mode: str
    weight_bytes: int
    rss_before_mib: float
    rss_after_mib: float
    bs1_tok_s: float = 0.0
    batch_tok_s: float = 0.0


def _start_and_measure(kwargs: dict[str, Any], check_len: int) -> tuple[int, float, float, list[list[int]]]:
    """In a fresh process: (weight bytes, RSS before, RSS after the engine started, greedy tokens)."""
    import sgl_ray

    before = _rss_mib()
    with sgl_ray.Engine(**kwargs) as eng:
        after = _rss_mib()
        weight_bytes = eng.get_stats()["weight_bytes"]
        outs = eng.generate(list(PROMPTS), {"temperature": 0.0, "max_new_tokens": check_len})
    return weight_bytes, before, after, [o["output_ids"] for o in outs]


def _time(eng: Any, prompts: list[str], output_len: int) -> float:
    params = {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True}
    t0 = time.perf_counter()
    eng.generate(prompts, params)
    return len(prompts) * output_len / (time.perf_counter() - t0)


def run_gguf_quantized(
    args: EngineArgs, output_len: int, batch_size: int, rounds: int, check_len: int
) -> tuple[RunInfo, list[ModeResult], bool]:
    """Returns the run's info, one result per mode of :data:`MODES`, and whether the greedy tokens agree."""
    import sgl_ray

    base = {k: v for k, v in asdict(args).items() if v is not None and k != "quantization"}
    spawn = multiprocessing.get_context("spawn")
    memory, tokens = {}, {}
    for mode in MODES:  # one fresh process each, one after the other: RSS is the process's own
        with spawn.Pool(1) as pool:
            *memory[mode], tokens[mode] = pool.apply(
                _start_and_measure, ({**base, "quantization": mode}, check_len)
            )
    engines = {mode: sgl_ray.Engine(**base, quantization=mode) for mode in MODES}
    try:
        batch = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        best = {(mode, kind): 0.0 for mode in MODES for kind in ("bs1", "batch")}
        for eng in engines.values():  # warm-up
            _time(eng, batch[:2], 4)
        for _ in range(rounds):
            for mode, eng in engines.items():
                best[mode, "bs1"] = max(best[mode, "bs1"], _time(eng, batch[:1], output_len))
                best[mode, "batch"] = max(best[mode, "batch"], _time(eng, batch, output_len))
        eng = engines[MODES[0]]
        run = RunInfo(
            model=eng.model_path, dtype=str(eng.model_config.dtype).removeprefix("torch."), engine_args=base
        )
    finally:
        for eng in engines.values():
            eng.shutdown()
    results = [ModeResult(mode, *memory[mode], best[mode, "bs1"], best[mode, "batch"]) for mode in MODES]
    return run, results, tokens[MODES[0]] == tokens[MODES[1]]


def format_results(results: list[ModeResult], batch_size: int) -> str:
    base = results[0]
    lines = [
        f"{'quantization':<12} | {'weights MiB':>11} | {'RSS before':>10} | {'RSS after':>9} | {'bs1 tok/s':>9} | "
        f"{f'bs{batch_size} tok/s':>10} | {'bs1 vs none':>11}",
        "-" * 90,
    ]
    for r in results:
        lines.append(
            f"{r.mode:<12} | {r.weight_bytes / 2**20:>11.1f} | {r.rss_before_mib:>10.0f} | {r.rss_after_mib:>9.0f} | "
            f"{r.bs1_tok_s:>9.2f} | {r.batch_tok_s:>10.2f} | {r.bs1_tok_s / base.bs1_tok_s:>10.2f}x"
        )
    return "\n".join(lines)


def _run(ns: argparse.Namespace) -> int:
    run, results, same = run_gguf_quantized(
        EngineArgs.from_cli_args(ns), ns.output_len, ns.batch_size, ns.rounds, ns.check_len
    )
    record = run.record(
        "gguf-quantized",
        {"output_len": ns.output_len, "batch_size": ns.batch_size, "rounds": ns.rounds},
        modes={r.mode: asdict(r) for r in results},
        greedy_tokens_equal=same,
    )
    write_jsonl(ns.output_file, [record])
    print(format_header(run))
    print(format_results(results, ns.batch_size))
    print(
        f"greedy tokens ({len(PROMPTS)} prompts, {ns.check_len} new tokens): {'equal' if same else 'DIFFERENT'}"
    )
    return 0 if same else 1


def add_gguf_quantized_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gguf-quantized",
        help="a GGUF model kept quantized vs dequantized at load: memory, greedy tokens, decode speed",
        description=sys.modules[__name__].__doc__.split("\n\n")[0],
    )
    EngineArgs.add_cli_args(p)
    p.add_argument("--output-len", type=int, default=32, help="new tokens per timed request")
    p.add_argument("--batch-size", type=int, default=8, help="requests at once in the batch workload")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per mode, alternating")
    p.add_argument("--check-len", type=int, default=16, help="greedy tokens compared per prompt")
    p.add_argument(
        "--output-file", default="bench_gguf_quantized.jsonl", help="JSONL file the record goes to"
    )
    p.set_defaults(bench_func=_run)
