"""``sgl-ray bench quant-accuracy``: how far each quantized format moves a model's next-token distributions from the
unquantized model's, over a fixed prompt set — the accuracy to read next to ``bench roofline``'s speed.

Every prompt runs teacher-forced through the engine's own prefill (one request per forward pass of the in-process
runner, the same kernels as a served prefill), and the full-vocabulary distribution at every prompt position is
compared with the reference engine's at that position:

- ``mean KL`` / ``max KL``: ``KL(P_ref || P_format)`` in nats, averaged over every position of every prompt / the
  largest at one position;
- ``top-1``: the share of positions whose most likely token is the reference's;
- ``NLL``: the mean negative log-likelihood of each prompt's actual next token (the reference's is its own row).

Formats (one engine each, one after the other, on the same float weights):

- the reference: ``quantization="none"`` (a quantized checkpoint dequantized to ``dtype``), ``kv_cache_dtype="auto"``;
- ``fp8``: online W8A8 FP8 (CUDA, compute capability 8.9 or more; skipped with a note elsewhere: on a CPU the
  engine's FP8 is weight-only, not what a GPU runs);
- ``awq``, ``gptq``: INT4 rounded to nearest at load (AWQ's asymmetric groups, GPTQ's symmetric ones; group 128,
  or the largest power of two that divides a layer's inputs): no calibration, so a calibrated checkpoint of the
  same model does better;
- ``fp8_e4m3``: the model unquantized with an FP8 e4m3 KV cache (scales 1.0 unless the checkpoint has some).

Prompts: :data:`PROMPTS` (32 varied English prompts), or ``--dataset`` (:mod:`sgl_ray.bench.datasets`: random text
or shared-prefix requests); without a tokenizer (``--skip-tokenizer-init``), seeded random token ids. Each prompt is
cut to ``max_tokens`` tokens. The default model is the embedded SmolLM2-135M-Instruct, real weights; a
``load_format="dummy"`` model's random weights make small, uninformative divergences.

Example::

    sgl-ray bench quant-accuracy                                     # the default model on this machine
    sgl-ray bench quant-accuracy --model-path /tmp/llama8b --load-format dummy --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sgl_ray.bench.report import RunInfo, format_header, write_jsonl
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.errors import UnsupportedModelError

FORMATS = ("fp8", "awq", "gptq", "fp8_e4m3")
"""Formats compared with the reference: three weight encodings and an FP8 KV cache."""

PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is",
    "Photosynthesis is the process by which green plants turn sunlight, water and carbon dioxide into",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old woodcutter who",
    "To make a simple tomato sauce, first heat some olive oil in a pan, then add the garlic and",
    "The French Revolution began in 1789 and changed the course of European history because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at 100 degrees Celsius at sea level, but on top of a high mountain it boils at a lower",
    "Dear Sir or Madam, I am writing to apply for the position of junior accountant advertised",
    "The three primary colours of light are red, green and",
    "In machine learning, overfitting happens when a model learns the training data too well and",
    "Shakespeare wrote many plays, including Hamlet, Macbeth, Othello and",
    "Q: What is 12 multiplied by 12?\nA:",
    "The mitochondria is often called the powerhouse of the cell because it",
    "My favourite season is autumn, when the leaves turn golden and the air smells of",
    "A haiku is a short poem with three lines of five, seven and five syllables. Here is one about the sea:",
    "The stock market fell sharply on Monday after the central bank announced that interest rates would",
    "To install the package, open a terminal and run the following command:",
    "The Great Wall of China stretches for thousands of kilometres across the north of the country and was built",
    "She opened the letter slowly, afraid of what it might say. The first line read:",
    "Translate into French: 'Good morning, how are you today?'\nFrench:",
    "The theory of relativity, developed by Albert Einstein, states that the laws of physics",
    "Regular exercise has many benefits for both the body and the mind, such as",
    "SELECT name, email FROM users WHERE",
    "The recipe calls for two cups of flour, one cup of sugar, three eggs and",
    "Jupiter is the largest planet in our solar system, with a mass more than twice that of",
    "When the train finally arrived, forty minutes late, the passengers on the platform",
    "Summary of the meeting: the team agreed to postpone the product launch until",
    "The human heart has four chambers: two atria and",
    "Climate change is caused mainly by the burning of fossil fuels, which releases",
    "Here are three tips for writing clear emails: first, keep the subject line short; second,",
    "The quick brown fox jumps over the lazy dog. This sentence is famous because it",
    "In 1969, Neil Armstrong became the first person to walk on the Moon, saying",
)


@dataclass(frozen=True)
class QuantAccuracyConfig:
    formats: tuple[str, ...] = FORMATS
    dataset: str | None = None  # None: PROMPTS
    num_prompts: int = len(PROMPTS)
    max_tokens: int = 128  # each prompt cut to this many tokens
    dataset_input_len: int = 128  # --dataset random: most tokens per prompt
    seed: int = 0


@dataclass(frozen=True)
class FormatResult:
    format: str  # "reference" or one of FORMATS
    quantization: str | None  # what the engine held its weights as
    kv_cache_dtype: str
    weight_bytes: int | None = None
    positions: int = 0
    mean_kl: float | None = None
    max_kl: float | None = None
    top1_agreement: float | None = None
    nll: float | None = None
    note: str = ""  # why a format was skipped

    @property
    def skipped(self) -> bool:
        return self.mean_kl is None


def format_args(args: EngineArgs, fmt: str) -> EngineArgs:
    """The engine options of ``fmt`` (``"reference"`` or one of :data:`FORMATS`) on the model of ``args``."""
    if fmt == "reference":
        return args.replace(quantization="none", kv_cache_dtype="auto")
    if fmt in ("fp8", "awq", "gptq"):
        return args.replace(quantization=fmt, kv_cache_dtype="auto")
    if fmt in ("fp8_e4m3", "fp8_e5m2"):
        return args.replace(quantization="none", kv_cache_dtype=fmt)
    raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


@torch.inference_mode()
def prompt_logprobs(runner: Any, token_ids: list[int]) -> torch.Tensor:
    """float32 ``[len(token_ids), vocab]`` on the runner's device: the log-softmax of the model's logits at every
    position of one prompt, from one prefill pass of an idle in-process runner (request slot 0, KV slots
    ``1 .. len``; nothing else is running, and no request points at those slots)."""
    from sgl_ray.scheduler.plan import StepPlan

    n = len(token_ids)
    if n >= runner.info.num_slots or n > runner.info.context_length:
        raise ValueError(f"a prompt of {n} tokens does not fit the KV pool or the context length")
    plan = StepPlan(
        step_id=0,
        req_pool_idxs=np.zeros(1, dtype=np.int64),
        prefix_lens=np.zeros(1, dtype=np.int64),
        extend_lens=np.array([n], dtype=np.int64),
        input_ids=np.asarray(token_ids, dtype=np.int64),
        out_cache_loc=np.arange(1, n + 1, dtype=np.int64),
        sample=np.ones(1, dtype=np.bool_),
        top_logprobs_num=np.full(1, -1, dtype=np.int64),
        input_logprob_start=np.full(1, -1, dtype=np.int64),
        input_logprob_counts=np.zeros(1, dtype=np.int64),
    )
    batch, _, _ = runner._build_batch(plan)
    hidden = runner.model(batch, None)
    logits = runner.model.compute_logits(hidden)[:, : runner.config.vocab_size]
    return torch.log_softmax(logits.float(), dim=-1)


def compare(ref: torch.Tensor, other: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """Per position ``KL(P_ref || P_other)`` [L] (from log-probabilities ``[L, vocab]``), how many positions agree
    on their most likely token, and the summed NLL of ``targets`` (the next tokens, [L - 1]) under ``other``."""
    kl = (ref.exp() * (ref - other)).sum(dim=-1).clamp(min=0)
    agree = int((ref.argmax(dim=-1) == other.argmax(dim=-1)).sum())
    nll = float(-other[:-1].gather(1, targets[:, None]).sum()) if len(targets) else 0.0
    return kl, agree, nll


def make_prompts(cfg: QuantAccuracyConfig, tokenizer: Any, vocab: int) -> list[list[int]]:
    """Token ids of the prompt set, each cut to ``cfg.max_tokens`` and at least 2 tokens long."""
    if tokenizer is None:  # no tokenizer: seeded random ids, PROMPTS' count and about their length
        rng = random.Random(cfg.seed)
        return [
            [rng.randrange(10, vocab) for _ in range(min(24, cfg.max_tokens))] for _ in range(cfg.num_prompts)
        ]
    if cfg.dataset is None:
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(cfg.num_prompts)]
    else:
        from sgl_ray.bench.datasets import DatasetConfig, make_requests

        dataset = DatasetConfig(
            cfg.dataset, num_prompts=cfg.num_prompts, input_len=cfg.dataset_input_len, seed=cfg.seed + 1
        )
        texts = [r.text for r in make_requests(dataset, tokenizer)]
    prompts = [tokenizer.encode(t)[: cfg.max_tokens] for t in texts]
    return [p for p in prompts if len(p) >= 2]


def _start(args: EngineArgs) -> Any:
    from sgl_ray.entrypoints.engine import Engine

    engine = Engine(**dataclasses.asdict(args))
    runner = getattr(engine._core, "runner", None)
    if runner is None or runner.shard.tp.world_size != 1 or runner.shard.pp_size != 1:
        engine.shutdown()
        raise ValueError("quant-accuracy runs the in-process engine on one device (no Ray, no parallelism)")
    return engine


def _release(engine: Any) -> None:
    engine.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_quant_accuracy(args: EngineArgs, cfg: QuantAccuracyConfig) -> tuple[RunInfo, list[FormatResult]]:
    """The reference engine's log-probabilities of every prompt position (kept on the CPU), then each format's
    against them; returns the run's info and one result per format, the reference first."""
    if args.uses_ray:
        raise ValueError("quant-accuracy runs the in-process engine on one device (no Ray, no parallelism)")
    most = max(cfg.max_tokens, cfg.dataset_input_len if cfg.dataset else 0)
    args = args.replace(max_total_tokens=args.max_total_tokens or max(2048, 2 * most))
    ref_args = format_args(args, "reference")
    engine = _start(ref_args)
    runner = engine._core.runner
    try:
        prompts = make_prompts(cfg, engine.tokenizer, runner.config.vocab_size)
        run = RunInfo(
            model=engine.model_path,
            dtype=str(runner.config.dtype).removeprefix("torch."),
            engine_args={k: v for k, v in dataclasses.asdict(args).items() if v is not None},
        )
        print(f"[quant-accuracy] reference: {len(prompts)} prompts", file=sys.stderr, flush=True)
        reference = [prompt_logprobs(runner, p).cpu() for p in prompts]
        positions = sum(len(p) for p in prompts)
        nll = sum(
            float(-r[:-1].gather(1, torch.tensor(p[1:])[:, None]).sum())
            for r, p in zip(reference, prompts, strict=True)
        )
        results = [
            FormatResult(
                "reference",
                runner.quantization,
                ref_args.kv_cache_dtype,
                engine.get_stats().get("weight_bytes"),
                positions,
                0.0,
                0.0,
                1.0,
                nll / (positions - len(prompts)),
            )
        ]
    finally:
        del runner
        _release(engine)
    for fmt in cfg.formats:
        results.append(_one_format(args, fmt, prompts, reference))
    return run, results


def _one_format(
    args: EngineArgs, fmt: str, prompts: list[list[int]], reference: list[torch.Tensor]
) -> FormatResult:
    fargs = format_args(args, fmt)
    held = fargs.quantization
    if fmt == "fp8" and args.torch_device().type != "cuda":
        note = "skipped: W8A8 FP8 runs on CUDA (compute capability 8.9+); on a CPU the engine's FP8 is weight-only"
        print(f"[quant-accuracy] {fmt}: {note}", file=sys.stderr, flush=True)
        return FormatResult(fmt, held, fargs.kv_cache_dtype, note=note)
    try:
        engine = _start(fargs)
    except UnsupportedModelError as exc:
        print(f"[quant-accuracy] {fmt}: skipped: {exc}", file=sys.stderr, flush=True)
        return FormatResult(fmt, held, fargs.kv_cache_dtype, note=f"skipped: {exc}")
    runner = engine._core.runner
    try:
        kls, agree, nll = [], 0, 0.0
        for ids, ref in zip(prompts, reference, strict=True):
            other = prompt_logprobs(runner, ids)
            kl, a, n = compare(ref.to(other.device), other, torch.tensor(ids[1:], device=other.device))
            kls.append(kl.cpu())
            agree += a
            nll += n
        kl_all = torch.cat(kls)
        positions = kl_all.numel()
        result = FormatResult(
            fmt,
            runner.quantization,
            fargs.kv_cache_dtype,
            engine.get_stats().get("weight_bytes"),
            positions,
            float(kl_all.mean()),
            float(kl_all.max()),
            agree / positions,
            nll / (positions - len(prompts)),
        )
    finally:
        del runner
        _release(engine)
    print(
        f"[quant-accuracy] {fmt}: mean KL {result.mean_kl:.3g}, top-1 {result.top1_agreement:.3f}",
        file=sys.stderr,
        flush=True,
    )
    return result


def format_results(results: list[FormatResult]) -> str:
    """The table: one row per format, the reference first."""
    lines = [
        "| format | weights as | KV cache | weight MiB | positions | mean KL | max KL | top-1 agreement | NLL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mib = "-" if r.weight_bytes is None else f"{r.weight_bytes / 2**20:.1f}"
        if r.skipped:
            lines.append(
                f"| {r.format} | {r.quantization or 'none'} | {r.kv_cache_dtype} | - | - | {r.note} | | | |"
            )
            continue
        lines.append(
            f"| {r.format} | {r.quantization or 'none'} | {r.kv_cache_dtype} | {mib} | {r.positions} | "
            f"{r.mean_kl:.4g} | {r.max_kl:.4g} | {r.top1_agreement:.3f} | {r.nll:.3f} |"
        )
    return "\n".join(lines)


def _run(ns: argparse.Namespace) -> int:
    if ns.num_prompts < 1 or ns.max_tokens < 2:
        print("[bench] --num-prompts must be >= 1 and --max-tokens >= 2", file=sys.stderr)
        return 2
    cfg = QuantAccuracyConfig(
        formats=tuple(ns.formats),
        dataset=ns.dataset,
        num_prompts=ns.num_prompts,
        max_tokens=ns.max_tokens,
        dataset_input_len=ns.input_len,
        seed=ns.seed,
    )
    try:
        run, results = run_quant_accuracy(EngineArgs.from_cli_args(ns), cfg)
    except ValueError as e:
        print(f"[bench] {e}", file=sys.stderr)
        return 2
    params = dataclasses.asdict(cfg)
    write_jsonl(
        ns.output_file,
        [run.record("quant-accuracy", params, **dataclasses.asdict(r)) for r in results],
    )
    print(format_header(run))
    print(format_results(results))
    print(f"records appended to {ns.output_file}")
    return 0


def add_quant_accuracy_args(sub: argparse._SubParsersAction) -> None:
    from sgl_ray.bench.datasets import DATASETS

    p = sub.add_parser(
        "quant-accuracy",
        help="KL divergence of next-token distributions, per quantized format, vs the unquantized model",
        description=sys.modules[__name__].__doc__.split("\n\n")[0],
    )
    EngineArgs.add_cli_args(p)
    w = p.add_argument_group("workload")
    w.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        default=list(FORMATS),
        help="formats compared with the reference (quantization none, kv-cache-dtype auto)",
    )
    w.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default=None,
        help="prompts from a bench dataset (default: built-in)",
    )
    w.add_argument("--num-prompts", type=int, default=len(PROMPTS), help="prompts (default: the built-in 32)")
    w.add_argument("--max-tokens", type=int, default=128, help="each prompt cut to this many tokens")
    w.add_argument("--input-len", type=int, default=128, help="--dataset: most tokens of a prompt")
    w.add_argument("--seed", type=int, default=0, help="seed of --dataset prompts and of token-id prompts")
    p.add_argument("--output-file", default="bench_quant_accuracy.jsonl", help="JSONL file the records go to")
    p.set_defaults(bench_func=_run)
