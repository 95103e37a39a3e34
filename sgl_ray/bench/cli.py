"""``sgl-ray bench …``: benchmark sub-commands, ``offline`` (in-process engine), ``serving`` (a running server) and
``lora`` (multi-LoRA throughput vs the base model).

Examples::

    sgl-ray bench offline                                   # SmolLM2, all workloads, vs transformers
    sgl-ray bench offline --workload bs1 --workload batch --num-prompts 64 --output-len 128
    sgl-ray bench offline --workload shared-prefix --prefix-len 2000 --skip-hf --plot bench.png
    sgl-ray bench offline --model-path /models/qwen2 --max-total-tokens 65536 --output-file results.jsonl
    sgl-ray bench serving --base-url http://127.0.0.1:8000 --num-prompts 64 --random-input-len 256 --plot s.png
    sgl-ray bench structured --num-prompts 16                # JSON schema: free vs constrained vs jump-forward
    sgl-ray bench gguf-quantized                             # GGUF kept quantized vs dequantized at load
    sgl-ray bench quant-accuracy                             # KL divergence per quantized format vs unquantized
    sgl-ray bench speculative                                # NGRAM speculative decoding on vs off, copy prompts
    sgl-ray bench serving --backend sglang-generate --dataset shared-prefix --prefix-len 1024 --num-prefixes 4 \
        --request-rate 8 --max-concurrency 16 --flush-cache
    sgl-ray bench lora --adapters 1 4 16 --num-prompts 64 --device cuda --dtype bfloat16 --model-path /models/llama

The same from Python::

    >>> import contextlib, io
    >>> from sgl_ray.cli import main
    >>> with contextlib.redirect_stdout(io.StringIO()) as table:  # the table goes to stdout, progress to stderr
    ...     status = main(["bench", "offline", "--workload", "bs1", "--output-len", "8", "--output-file", "/dev/null"])
    >>> status, "out tok/s" in table.getvalue()
    (0, True)
"""

from __future__ import annotations

import argparse
import math
import sys

from sgl_ray.bench.datasets import DATASETS, DatasetConfig
from sgl_ray.bench.offline import WORKLOADS, OfflineConfig, run_offline
from sgl_ray.bench.plot import plot_serving
from sgl_ray.bench.quant_accuracy import add_quant_accuracy_args
from sgl_ray.bench.quantized import add_gguf_quantized_args
from sgl_ray.bench.report import format_header, format_table, plot, to_record, write_jsonl
from sgl_ray.bench.serving import BACKENDS, ServingConfig, ServingResult, run_serving_benchmark
from sgl_ray.bench.spec_verify import add_spec_verify_args
from sgl_ray.bench.speculative import add_speculative_args
from sgl_ray.bench.structured import add_structured_args
from sgl_ray.bench.vision import add_vision_args
from sgl_ray.bench.window_kv import add_window_kv_args
from sgl_ray.configs.engine_args import EngineArgs


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` sub-commands to ``parser`` (the ``sgl-ray bench`` parser)."""
    sub = parser.add_subparsers(
        dest="bench_command",
        required=True,
        metavar=(
            "{offline,serving,roofline,step-profile,lora,structured,gguf-quantized,quant-accuracy,speculative,"
            "spec-verify,moe-kernels,window-kv,vision}"
        ),
    )
    offline = sub.add_parser(
        "offline",
        help="offline throughput: sgl_ray's Engine vs transformers generate, side by side",
        description=(
            "Time the bs1, batch and shared-prefix workloads on the in-process Engine and, in the same run, on "
            "transformers generate (bs1, batch) or on the engine with the radix cache off (shared-prefix)."
        ),
    )
    EngineArgs.add_cli_args(offline)
    w = offline.add_argument_group("workloads")
    w.add_argument(
        "--workload",
        action="append",
        choices=WORKLOADS,
        help="workload to run (repeatable; default: all of them)",
    )
    w.add_argument(
        "--engine-only",
        action="store_true",
        default=True,
        help="time the in-process Engine (no Ray); the only mode so far, and the default",
    )
    w.add_argument("--input-len", type=int, default=128, help="prompt tokens (bs1; the maximum for batch)")
    w.add_argument(
        "--output-len", type=int, default=None, help="new tokens per request (default 64; 16 shared-prefix)"
    )
    w.add_argument(
        "--num-prompts", type=int, default=None, help="requests (default 32 batch, 64 shared-prefix)"
    )
    w.add_argument("--prefix-len", type=int, default=1000, help="tokens of the shared few-shot prefix")
    w.add_argument("--suffix-len", type=int, default=32, help="tokens of each request's own question (about)")
    w.add_argument(
        "--hf-batch-size", type=int, default=16, help="static batch size of the transformers baseline"
    )
    w.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    w.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    o = offline.add_argument_group("output")
    o.add_argument(
        "--output-file", default="bench_offline.jsonl", help="JSONL file the records are appended to"
    )
    o.add_argument(
        "--plot", default=None, metavar="FILE.png", help="bar chart of output tok/s (needs matplotlib)"
    )
    offline.set_defaults(bench_func=_offline)
    _add_serving_args(sub)
    _add_roofline_args(sub)
    _add_step_profile_args(sub)
    _add_lora_args(sub)
    add_structured_args(sub)
    add_gguf_quantized_args(sub)
    add_quant_accuracy_args(sub)
    add_speculative_args(sub)
    add_spec_verify_args(sub)
    add_window_kv_args(sub)
    add_vision_args(sub)
    moe = sub.add_parser(
        "moe-kernels",
        help="the MoE expert kernels alone (CUDA): --tune the launch table, or --bench it against the torch experts",
    )
    moe.set_defaults(bench_func=_moe_kernels)
    from sgl_ray.bench.moe_kernels import add_args as add_moe_kernel_args  # imports torch only

    add_moe_kernel_args(moe)
    qk = sub.add_parser(
        "quant-kernels",
        help="the one-row FP8/INT4 GEMVs (and FP8/INT4 GEMMs) alone (CUDA) against the bf16 GEMV and the copy rate",
    )
    qk.set_defaults(bench_func=_quant_kernels)
    from sgl_ray.bench.quant_kernels import add_args as add_quant_kernel_args  # imports torch only

    add_quant_kernel_args(qk)


def _triple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by ':', got {text!r}") from None


def _add_roofline_args(sub: argparse._SubParsersAction) -> None:
    roof = sub.add_parser(
        "roofline",
        help="the engine vs the roofline floor (measured bandwidth and FLOP rate) and transformers",
        description=(
            "Measure the device's copy bandwidth and matmul rate, then time bs1 decode, offline batches and a "
            "shared-prefix workload (radix on and off) and report each against its roofline floor."
        ),
    )
    EngineArgs.add_cli_args(roof)
    w = roof.add_argument_group("workloads")
    w.add_argument("--bs1-input-len", type=int, default=128)
    w.add_argument("--bs1-output-len", type=int, default=256)
    w.add_argument("--offline", type=_triple, action="append", default=[], metavar="N:IN:OUT")
    w.add_argument("--shared-prefix", type=_triple, default=None, metavar="N:PREFIX:SUFFIX:OUT")
    w.add_argument(
        "--hf-batch", type=_triple, default=None, metavar="N:IN:OUT", help="transformers batch run"
    )
    w.add_argument("--skip-hf", action="store_true", help="skip transformers")
    w.add_argument(
        "--ray",
        action="store_true",
        help="also run bs1 through the Ray actors (scheduler actor + shard actors; starts a local Ray cluster "
        "unless --ray-address names one) and report its tok/s and GPU idle share next to the in-process run",
    )
    w.add_argument(
        "--baseline",
        action="store_true",
        help="also run bs1 and the offline batches on the same model unquantized (--quantization none, "
        "--kv-cache-dtype auto), after the main engine, so a quantized run has its float rows from the same call",
    )
    w.add_argument("--seed", type=int, default=0)
    roof.add_argument("--output-file", default="bench_roofline.jsonl", help="JSONL file the records go to")
    roof.set_defaults(bench_func=_roofline)


def _roofline(ns: argparse.Namespace) -> int:
    from sgl_ray.bench.fastpath import RooflineConfig, format_roofline, run_roofline, to_record

    for spec, n in [(s, 3) for s in ns.offline] + ([(ns.shared_prefix, 4)] if ns.shared_prefix else []):
        if len(spec) != n or min(spec) < 1:
            print(f"[bench] bad workload {':'.join(map(str, spec))}: {n} positive integers", file=sys.stderr)
            return 2
    cfg = RooflineConfig(
        bs1_input_len=ns.bs1_input_len,
        bs1_output_len=ns.bs1_output_len,
        offline=tuple(ns.offline),
        shared_prefix=ns.shared_prefix,
        hf_batch=ns.hf_batch,
        skip_hf=ns.skip_hf,
        seed=ns.seed,
        ray=ns.ray,
        baseline=ns.baseline,
    )
    with open(ns.output_file, "a") as f:

        def record(
            facts, row
        ) -> None:  # as each row is measured: a long run that is cut short keeps its rows
            f.write(to_record(facts, row) + "\n")
            f.flush()

        rates, facts, rows = run_roofline(EngineArgs.from_cli_args(ns), cfg, record)
    print(format_roofline(rates, facts, rows))
    return 0


def _add_step_profile_args(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser(
        "step-profile",
        help="one decode step's device time, kernel by kernel, against its roofline floor (CUDA)",
        description=(
            "Replay the engine's decode CUDA graph for a batch at a fixed context, time it, and charge each kernel "
            "the device time it adds (overlapping launches counted once)."
        ),
    )
    EngineArgs.add_cli_args(prof)
    w = prof.add_argument_group("workload")
    w.add_argument("--batch-size", type=int, default=1, help="decode requests in the step")
    w.add_argument("--context", type=int, default=384, help="tokens of each request, the new one included")
    w.add_argument("--replays", type=int, default=50, help="timed replays")
    w.add_argument("--profiled", type=int, default=10, help="replays under the profiler")
    w.add_argument("--top", type=int, default=30, help="kernels listed")
    prof.set_defaults(bench_func=_step_profile)


def _step_profile(ns: argparse.Namespace) -> int:
    from sgl_ray.bench.step_profile import format_profile, run_step_profile

    if min(ns.batch_size, ns.context, ns.replays, ns.profiled) < 1:
        print("[bench] --batch-size, --context, --replays and --profiled must be positive", file=sys.stderr)
        return 2
    try:
        result = run_step_profile(
            EngineArgs.from_cli_args(ns), ns.batch_size, ns.context, ns.replays, ns.profiled
        )
    except ValueError as e:
        print(f"[bench] {e}", file=sys.stderr)
        return 2
    print(format_profile(result, ns.top))
    return 0


def _add_lora_args(sub: argparse._SubParsersAction) -> None:
    lora = sub.add_parser(
        "lora",
        help="multi-LoRA throughput: 1, 4, 16 distinct adapters in a batch vs the base model",
        description=(
            "Time one batch of random prompts on the base model and, right after, spread round-robin over k random "
            "rank-r LoRA adapters (all target modules), for each k."
        ),
    )
    EngineArgs.add_cli_args(lora)
    w = lora.add_argument_group("workload")
    w.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16], help="distinct adapters per run")
    w.add_argument("--num-prompts", type=int, default=32, help="requests per run")
    w.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    w.add_argument("--output-len", type=int, default=64, help="new tokens per request")
    w.add_argument("--lora-rank", type=int, default=16, help="rank of the random adapters")
    w.add_argument("--seed", type=int, default=0, help="seed of the prompts and adapter weights")
    w.add_argument(
        "--repeats", type=int, default=1, help="alternate base/adapter runs; keep the fastest of each"
    )
    lora.add_argument(
        "--output-file", default="bench_lora.jsonl", help="JSONL file the records are appended to"
    )
    lora.set_defaults(bench_func=_lora)


def _add_serving_args(sub: argparse._SubParsersAction) -> None:
    serving = sub.add_parser(
        "serving",
        help="online serving: TTFT, ITL, TPOT, latency and throughput of a running server (like bench_serving)",
        description=(
            "Stream requests to any OpenAI-compatible server or an sgl_ray/SGLang /generate endpoint, arriving as a "
            "Poisson process, and time each one from the client. Every request makes exactly its output length "
            "(ignore_eos)."
        ),
    )
    s = serving.add_argument_group("server")
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL, without /v1")
    s.add_argument("--backend", choices=sorted(BACKENDS), default="openai-chat", help="API to call")
    s.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    s.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    s.add_argument("--flush-cache", action="store_true", help="POST /flush_cache after the warm-up")
    d = serving.add_argument_group("workload")
    d.add_argument("--dataset", choices=sorted(DATASETS), default="random")
    d.add_argument("--num-prompts", type=int, default=200, help="requests to send")
    d.add_argument("--random-input-len", type=int, default=1024, help="most prompt tokens (random)")
    d.add_argument(
        "--random-output-len",
        "--output-len",
        dest="output_len",
        type=int,
        default=128,
        help="tokens per request",
    )
    d.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="prompt lengths uniform in [len*ratio, len]"
    )
    d.add_argument("--prefix-len", type=int, default=512, help="tokens of each shared system prompt")
    d.add_argument("--num-prefixes", type=int, default=8, help="shared system prompts (shared-prefix)")
    d.add_argument("--question-len", type=int, default=32, help="tokens of each request's question")
    d.add_argument(
        "--tokenizer", default=None, help="tokenizer of the prompts (default: the embedded SmolLM2)"
    )
    d.add_argument("--seed", type=int, default=1, help="seed of the prompts and the arrival times")
    t = serving.add_argument_group("traffic")
    t.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default: inf)")
    t.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    o = serving.add_argument_group("output")
    o.add_argument(
        "--output-file", default="bench_serving.jsonl", help="JSONL file the record is appended to"
    )
    o.add_argument(
        "--plot", default=None, metavar="FILE.png", help="latency CDFs and throughputs (matplotlib)"
    )
    serving.set_defaults(bench_func=_serving)


def run_bench(ns: argparse.Namespace) -> int:
    """Run the ``bench`` sub-command parsed into ``ns``; returns the exit status."""
    return ns.bench_func(ns)


def _quant_kernels(ns: argparse.Namespace) -> int:
    from sgl_ray.bench import quant_kernels

    return quant_kernels.run(ns)


def _moe_kernels(ns: argparse.Namespace) -> int:
    from sgl_ray.bench import moe_kernels

    return moe_kernels.run(ns)


def _offline(ns: argparse.Namespace) -> int:
    cfg = OfflineConfig(
        workloads=tuple(ns.workload or WORKLOADS),
        input_len=ns.input_len,
        output_len=ns.output_len,
        num_prompts=ns.num_prompts,
        prefix_len=ns.prefix_len,
        suffix_len=ns.suffix_len,
        hf_batch_size=ns.hf_batch_size,
        seed=ns.seed,
        skip_hf=ns.skip_hf,
    )
    run, results = run_offline(EngineArgs.from_cli_args(ns), cfg)
    write_jsonl(ns.output_file, [to_record(r, run) for r in results])
    print(format_header(run))
    print(format_table(results))
    print(f"records appended to {ns.output_file}")
    if ns.plot and plot(results, ns.plot):
        print(f"plot written to {ns.plot}")
    return 0


def _lora(ns: argparse.Namespace) -> int:
    from sgl_ray.bench.lora import LoRABenchConfig, run_lora_bench

    cfg = LoRABenchConfig(
        adapter_counts=tuple(ns.adapters),
        num_prompts=ns.num_prompts,
        input_len=ns.input_len,
        output_len=ns.output_len,
        rank=ns.lora_rank,
        seed=ns.seed,
        repeats=ns.repeats,
    )
    run, results = run_lora_bench(EngineArgs.from_cli_args(ns), cfg)
    write_jsonl(ns.output_file, [to_record(r, run) for r in results])
    print(format_header(run))
    print(format_table(results))
    print(f"records appended to {ns.output_file}")
    return 0


def _serving(ns: argparse.Namespace) -> int:
    dataset = DatasetConfig(
        name=ns.dataset,
        num_prompts=ns.num_prompts,
        input_len=ns.random_input_len,
        output_len=ns.output_len,
        range_ratio=ns.random_range_ratio,
        prefix_len=ns.prefix_len,
        num_prefixes=ns.num_prefixes,
        question_len=ns.question_len,
        seed=ns.seed,
    )
    cfg = ServingConfig(
        base_url=ns.base_url,
        backend=ns.backend,
        model=ns.model,
        dataset=dataset,
        request_rate=ns.request_rate,
        max_concurrency=ns.max_concurrency,
        api_key=ns.api_key,
        tokenizer=ns.tokenizer,
        flush_cache=ns.flush_cache,
    )
    print(f"[bench] {ns.num_prompts} {ns.dataset} requests to {ns.base_url} ({ns.backend})", file=sys.stderr)
    try:
        result = run_serving_benchmark(cfg)
    except RuntimeError as e:
        print(f"[bench] {e}", file=sys.stderr)
        return 1
    write_jsonl(ns.output_file, [result.to_record()])
    print(format_serving(result))
    print(f"record appended to {ns.output_file}")
    if ns.plot and plot_serving([result], ns.plot):
        print(f"plot written to {ns.plot}")
    return 0 if result.metrics.completed else 1


def format_serving(result: ServingResult) -> str:
    """The compact summary of a serving run: requests, tokens and throughputs, then mean/p50/p90/p99 per latency."""
    m, cfg = result.metrics, result.config
    hit = "-" if m.cache_hit_rate is None else f"{100 * m.cache_hit_rate:.1f} %"
    lines = [
        f"{result.date} · {cfg.backend} · {cfg.dataset.name} · {cfg.base_url} · model {result.model or '-'}"
        f" · rate {cfg.request_rate} req/s · max concurrency {cfg.max_concurrency or '-'}",
        f"requests | {m.completed} ok, {m.failed} failed in {result.duration_s:.2f} s"
        f" = {m.request_throughput:.2f} req/s",
        f"tokens   | in {m.input_tokens} ({m.input_throughput:.1f} tok/s) · out {m.output_tokens}"
        f" ({m.output_throughput:.1f} tok/s) · cached {m.cached_tokens} (hit rate {hit})",
        f"{'ms':<8} | {'mean':>9} | {'p50':>9} | {'p90':>9} | {'p99':>9}",
        "---------+-----------+-----------+-----------+----------",
    ]
    for name in ("ttft", "itl", "tpot", "e2e"):
        cells = ("-" if v is None else f"{v:.2f}" for v in getattr(m, name))
        lines.append(f"{name.upper():<8} | " + " | ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)
