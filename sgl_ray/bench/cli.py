"""``sgl-ray bench …``: benchmark sub-commands (``offline`` now; ``serving`` and ``roofline`` to come).

Examples::

    sgl-ray bench offline                                   # SmolLM2, all workloads, vs transformers
    sgl-ray bench offline --workload bs1 --workload batch --num-prompts 64 --output-len 128
    sgl-ray bench offline --workload shared-prefix --prefix-len 2000 --skip-hf --plot bench.png
    sgl-ray bench offline --model-path /models/qwen2 --max-total-tokens 65536 --output-file results.jsonl

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

from sgl_ray.bench.offline import WORKLOADS, OfflineConfig, run_offline
from sgl_ray.bench.report import format_header, format_table, plot, to_record, write_jsonl
from sgl_ray.configs.engine_args import EngineArgs


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` sub-commands to ``parser`` (the ``sgl-ray bench`` parser)."""
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="{offline}")
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


def run_bench(ns: argparse.Namespace) -> int:
    """Run the ``bench`` sub-command parsed into ``ns``; returns the exit status."""
    return ns.bench_func(ns)


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
