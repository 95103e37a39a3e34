"""``sgl-ray bench spec-verify``: what a speculative verify step costs the target, against one decode step.

A verify step runs a request's newest token and its ``k`` drafts through the target as one ``k + 1``-token extend
over the cached context and samples every row; a decode step runs one token (on CUDA, a replay of the captured
decode graph). With an accepted length of ``a`` tokens per verify step (the bonus token included), speculation
speeds decoding up by at most ``a / (t_verify(k) / t_decode)``, before the drafter's own cost: the ratio printed
per ``k`` is that ceiling's denominator.

Both steps are timed on the in-process engine's runner directly (no scheduler, no drafter): one request at a fixed
context (its KV slots a random permutation of the pool, as in a pool that has been in use for a while), greedy,
the step kinds taking turns over the repeats, the median of each reported. Verify steps run eagerly, as the
engine runs them; each time includes the host's work for the step and the copy of its tokens back.

Example (on a GPU, with a config-only model directory and random weights)::

    sgl-ray bench spec-verify --model-path /tmp/llama8b --load-format dummy --skip-tokenizer-init \\
        --dtype bfloat16 --context 1024 --drafts 1,2,4,8,16
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sgl_ray.configs.engine_args import EngineArgs


@dataclass(frozen=True)
class VerifyCost:
    drafts: int  # k: the verify step runs k + 1 tokens
    ms: float  # median time of the step
    ratio: float  # ms over the decode step's


@dataclass(frozen=True)
class VerifyReport:
    context: int
    decode_ms: float
    decode_graph: bool  # the decode step replayed a CUDA graph
    rows: list[VerifyCost]


def _plan(step_id: int, context: int, slots: np.ndarray, tokens: int) -> Any:
    from sgl_ray.scheduler.plan import StepPlan

    one = np.ones(1, dtype=np.int64)
    return StepPlan(
        step_id=step_id,
        req_pool_idxs=np.zeros(1, dtype=np.int64),
        prefix_lens=one * context,
        extend_lens=one * tokens,
        input_ids=np.ones(tokens, dtype=np.int64),
        out_cache_loc=slots[context : context + tokens],
        sample=np.ones(1, dtype=np.bool_),
        sample_counts=one * tokens if tokens > 1 else np.empty(0, dtype=np.int64),
        top_logprobs_num=one * -1,
        input_logprob_start=one * -1,
        input_logprob_counts=one * 0,
    )


def measure(runner: Any, context: int, drafts: list[int], repeats: int = 20, seed: int = 0) -> VerifyReport:
    """Time decode and verify steps on an idle :class:`~sgl_ray.runner.model_runner.ModelRunner` (request slot 0;
    its table row and the KV slots it points at are overwritten)."""
    from sgl_ray.sampling.params import SamplingParams
    from sgl_ray.scheduler.plan import NewRequest, StepPlan

    info = runner.info
    need = context + max(drafts) + 1
    if context < 1 or min(drafts) < 1:
        raise ValueError("--context and every --drafts count must be positive")
    if need > info.context_length or need >= info.num_slots:
        raise ValueError(
            f"a context of {context} plus {max(drafts) + 1} tokens does not fit: {info.num_slots} KV slots, "
            f"context length {info.context_length}"
        )
    g = torch.Generator().manual_seed(seed)
    slots = (torch.randperm(info.num_slots - 1, generator=g)[:need] + 1).numpy().astype(np.int64)
    greedy = NewRequest(
        req_pool_idx=0, sampling=SamplingParams(temperature=0.0), seed=0, eos_token_ids=[], prompt_ids=[],
        output_ids=[],
    )  # fmt: skip
    positions = np.arange(need, dtype=np.int64)
    runner.execute(
        StepPlan(
            step_id=0, new_requests=[greedy], table_req=np.zeros(need, dtype=np.int64), table_pos=positions,
            table_slot=slots,
        )
    )  # fmt: skip
    kinds = [1] + [k + 1 for k in drafts]  # tokens per step: decode, then each verify size
    times: dict[int, list[float]] = {t: [] for t in kinds}
    step = 1
    for rep in range(repeats + 2):  # the first two rounds warm up (compiles, allocator, graphs)
        for tokens in kinds:
            plan = _plan(step, context, slots, tokens)
            step += 1
            t0 = time.perf_counter()
            out = runner.execute(plan)
            elapsed = time.perf_counter() - t0
            assert len(out.next_token_ids) == tokens, (len(out.next_token_ids), tokens)
            if rep >= 2:
                times[tokens].append(elapsed * 1e3)
    decode_ms = statistics.median(times[1])
    rows = [
        VerifyCost(k, statistics.median(times[k + 1]), statistics.median(times[k + 1]) / decode_ms)
        for k in drafts
    ]
    graphs = runner.cuda_graphs
    return VerifyReport(context, decode_ms, graphs is not None and graphs.can_run(1), rows)


def format_report(r: VerifyReport) -> str:
    how = "CUDA graph" if r.decode_graph else "eager"
    lines = [
        f"context {r.context}: decode step {r.decode_ms:.3f} ms ({how}); verify steps (eager):",
        f"{'drafts':>6} {'tokens':>6} {'ms':>9} {'x decode':>9} {'speed-up ceiling at a = k + 1':>30}",
    ]
    for row in r.rows:
        lines.append(
            f"{row.drafts:>6} {row.drafts + 1:>6} {row.ms:>9.3f} {row.ratio:>9.2f} {(row.drafts + 1) / row.ratio:>30.2f}"
        )
    return "\n".join(lines)


def run_spec_verify(args: EngineArgs, context: int, drafts: list[int], repeats: int) -> VerifyReport:
    """Start an in-process engine on ``args`` (no speculation), time its steps, shut it down."""
    from sgl_ray.entrypoints.engine import Engine

    if args.uses_ray:
        raise ValueError("spec-verify times the in-process engine on one device (no Ray, no parallelism)")
    if args.speculative_algorithm is not None:
        raise ValueError("spec-verify times the target alone: leave --speculative-algorithm unset")
    engine = Engine(**dataclasses.asdict(args))
    try:
        runner = getattr(engine._core, "runner", None)
        if runner is None:
            raise ValueError("spec-verify needs the in-process engine")
        return measure(runner, context, drafts, repeats)
    finally:
        engine.shutdown()


def add_spec_verify_args(sub: Any) -> None:
    """The ``sgl-ray bench spec-verify`` sub-command."""
    p = sub.add_parser(
        "spec-verify",
        help="a speculative verify step of 1..16 drafts against one decode step (the speed-up's ceiling)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    EngineArgs.add_cli_args(p)
    w = p.add_argument_group("workload")
    w.add_argument("--context", type=int, default=1024, help="tokens already cached for the request")
    w.add_argument("--drafts", default="1,2,3,4,6,8,12,16", help="comma-separated draft counts k")
    w.add_argument("--repeats", type=int, default=20, help="timed rounds (each step kind once per round)")
    p.set_defaults(bench_func=_main)


def _main(ns: Any) -> int:
    import sys

    try:
        drafts = [int(k) for k in ns.drafts.split(",") if k]
        if not drafts or ns.repeats < 1:
            raise ValueError("--drafts needs at least one count and --repeats must be positive")
        report = run_spec_verify(EngineArgs.from_cli_args(ns), ns.context, drafts, ns.repeats)
    except ValueError as e:
        print(f"[bench] {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
