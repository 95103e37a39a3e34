"""``sgl-ray bench window-kv``: a sliding-window model's KV with and without letting go of what the windows left.

A model whose every layer attends within a window (Mistral-shaped) runs the same long-prompt workload twice in one
process, one engine after the other with the same pool: first with ``disable_hybrid_swa_memory`` (every page kept
until the request ends), then with the default (a request keeps its window's pages only). Reported per mode: the
most KV slots running requests held at once and the most requests running at once (the pool fits more of them
when each keeps only its window), preemptions, aborted requests, wall time and output tok/s. Random
prompts of ``--input-len`` tokens, ``--output-len`` new tokens each (greedy, ``ignore_eos``), all submitted at once.

Example::

    sgl-ray bench window-kv --model-path /models/mistral-7b-shape --load-format dummy --skip-tokenizer-init \\
        --max-total-tokens 65536 --input-len 8192 --output-len 128 --num-prompts 32
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from sgl_ray.bench.report import RunInfo, format_header, write_jsonl
from sgl_ray.configs.engine_args import EngineArgs


@dataclass
class WindowResult:
    mode: str
    window: int | None
    requests: int
    aborted: int
    output_tokens: int
    wall_s: float
    peak_held_slots: int
    peak_running: int
    preemptions: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "output_tok_s": self.output_tok_s}


def add_window_kv_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "window-kv",
        help="a sliding-window model's KV held with and without letting go of what the windows left",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    EngineArgs.add_cli_args(p)
    p.add_argument("--input-len", type=int, default=8192, help="prompt tokens of every request")
    p.add_argument("--output-len", type=int, default=128, help="new tokens of every request")
    p.add_argument("--num-prompts", type=int, default=32, help="requests, submitted at once")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument(
        "--output-file", default="bench_window_kv.jsonl", help="JSONL file the record is appended to"
    )
    p.set_defaults(bench_func=_run)


def run_window_kv(
    args: EngineArgs, input_len: int, output_len: int, num_prompts: int, seed: int = 0
) -> tuple[RunInfo, list[WindowResult]]:
    """Both modes, one engine at a time (keep-all first). Each gets one short warm-up request."""
    import sgl_ray

    options = {k: v for k, v in asdict(args).items() if v is not None}
    results: list[WindowResult] = []
    run: RunInfo | None = None
    for mode, keep in (("keep-all", True), ("window", False)):
        with sgl_ray.Engine(**{**options, "disable_hybrid_swa_memory": keep}) as engine:
            kv = engine._core.scheduler.kv  # in-process core: the scheduler's KV manager
            if run is None:
                run = RunInfo(
                    model=engine.model_path,
                    dtype=str(engine.model_config.dtype).removeprefix("torch."),
                    engine_args={k: v for k, v in options.items() if k != "model_path"},
                )
            if not keep and kv.window is None:
                raise SystemExit("window-kv: the model does not attend within a window in every layer")
            vocab = engine.model_config.vocab_size
            rng = random.Random(seed)
            prompts = [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(num_prompts)]
            params = {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True}
            engine.generate(input_ids=prompts[0][:64], sampling_params={**params, "max_new_tokens": 4})
            engine.flush_cache()
            kv.peak_held = kv.peak_running = 0
            before = engine.get_stats()["num_preemptions"]
            t0 = time.perf_counter()
            outs = engine.generate(input_ids=prompts, sampling_params=params)
            wall = time.perf_counter() - t0
            stats = engine.get_stats()
            results.append(
                WindowResult(
                    mode=mode,
                    window=kv.window,
                    requests=len(outs),
                    aborted=sum(o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs),
                    output_tokens=sum(len(o["output_ids"]) for o in outs),
                    wall_s=wall,
                    peak_held_slots=stats["kv_peak_held"],
                    peak_running=stats["peak_running"],
                    preemptions=stats["num_preemptions"] - before,
                )
            )
        gc.collect()
    assert run is not None
    return run, results


def format_window_kv(results: list[WindowResult], capacity_note: str = "") -> str:
    lines = [
        f"{'mode':<9} | {'window':>6} | {'requests':>8} | {'aborted':>7} | {'peak KV held':>12} | "
        f"{'peak running':>12} | {'preemptions':>11} | {'wall s':>7} | out tok/s",
        "-" * 105,
    ]
    for r in results:
        lines.append(
            f"{r.mode:<9} | {r.window or '-':>6} | {r.requests:>8} | {r.aborted:>7} | {r.peak_held_slots:>12} | "
            f"{r.peak_running:>12} | {r.preemptions:>11} | {r.wall_s:>7.2f} | {r.output_tok_s:.1f}"
        )
    return "\n".join(lines + ([capacity_note] if capacity_note else []))


def _run(ns: argparse.Namespace) -> int:
    args = EngineArgs.from_cli_args(ns)
    run, results = run_window_kv(args, ns.input_len, ns.output_len, ns.num_prompts, ns.seed)
    record = run.record(
        "window-kv",
        {"input_len": ns.input_len, "output_len": ns.output_len, "num_prompts": ns.num_prompts},
        modes={r.mode: r.to_dict() for r in results},
    )
    write_jsonl(ns.output_file, [record])
    print(format_header(run))
    print(format_window_kv(results))
    print(f"1 record appended to {ns.output_file}")
    return 0
