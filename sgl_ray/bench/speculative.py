"""``sgl-ray bench speculative``: speculative decoding on vs off on copy-heavy prompts, side by side in one run.

Both engines (the same model and options, one with ``speculative_algorithm``, NGRAM unless given) run the same
chat prompts about a given text, greedy: ``--task copy`` (repeat it, the default), ``edit`` (fix its typos, or
rewrite it in the past tense), ``summarize`` or ``continue`` (comma-separated: each in turn). Each prompt runs alone (batch 1)
and streams; decode tok/s is the tokens after the first over the time after the first (so prefill is left out).
The engines take turns over ``--rounds`` rounds (the machines are noisy) and the best round of each is reported,
with the accept length (tokens per verify step, the bonus token included) and the accept rate. The greedy outputs
of both must be identical token for token: the command fails otherwise.

Example::

    sgl-ray bench speculative                                   # SmolLM2, NGRAM, CPU
    sgl-ray bench speculative --task copy,edit,summarize,continue
    sgl-ray bench speculative --speculative-num-draft-tokens 6 --max-new-tokens 96 --rounds 3
    sgl-ray bench speculative --speculative-algorithm STANDALONE --speculative-draft-model-path /models/draft
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from sgl_ray.bench.report import RunInfo, format_header, write_jsonl
from sgl_ray.configs.engine_args import EngineArgs

PASSAGES = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel, the baker opened his shutters, "
    "and a dog chased gulls along the harbour wall until the church bell rang eight times.",
    "To reset the router, unplug it from the wall, wait thirty seconds, and plug it back in. When the light on "
    "the front turns green, open the settings page and check that the network name is still the same.",
    "Our team meets every Tuesday at nine. We review the open tickets, agree on the priorities for the week, "
    "and write down who owns each task. The notes are shared in the team folder after the meeting.",
    "Mix two cups of flour with a spoon of sugar and a pinch of salt. Add one egg and a cup of milk, stir until "
    "smooth, and let the batter rest for ten minutes before you pour it into a hot pan.",
    "The library is open from Monday to Friday, from eight in the morning until six in the evening. Books can "
    "be borrowed for three weeks and renewed twice, unless another reader has reserved them.",
    "Each planet in the solar system follows its own orbit around the Sun. Mercury is the closest and the "
    "fastest, while Neptune is the farthest and takes about one hundred and sixty five years to go around.",
)
TASKS = {  # chat prompts per workload: a passage to repeat, edit, summarize or continue
    "copy": (
        "Repeat the following text exactly:\n{text}",
        "Copy the following paragraph word for word:\n{text}",
    ),
    "edit": (
        "Fix the spelling mistakes in the following text and write out the corrected text in full:\n{typos}",
        "Rewrite the following text in the past tense, changing nothing else:\n{text}",
    ),
    "summarize": (
        "Summarize the following text in two sentences:\n{text}",
        "Write a short summary of this paragraph:\n{text}",
    ),
    "continue": (
        "Continue the following text with a few more sentences:\n{text}",
        "Here is the start of a story. Repeat it and then continue it:\n{text}",
    ),
}


@dataclass
class ModeResult:
    mode: str
    requests: int
    output_tokens: int
    decode_tokens: int  # tokens after each request's first
    decode_s: float  # time after each request's first token
    wall_s: float
    verify_steps: int = 0
    accept_length: float = 0.0  # tokens per verify step (the bonus token included)
    accept_rate: float = 0.0  # accepted drafts / proposed drafts

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_tok_s": self.decode_tok_s}


def add_speculative_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "speculative",
        help="speculative decoding on vs off on copy-heavy prompts (decode tok/s, accept length)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    EngineArgs.add_cli_args(p)
    p.add_argument(
        "--task",
        default="copy",
        help=f"workloads, comma-separated: {', '.join(TASKS)} (a passage to repeat, fix or rewrite, summarize, "
        "continue)",
    )
    p.add_argument(
        "--num-prompts", type=int, default=6, help="prompts (passages cycle through the task's prompts)"
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="token limit of each request")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per mode, alternating (best reported)")
    p.add_argument(
        "--output-file", default="bench_speculative.jsonl", help="JSONL file the record is appended to"
    )
    p.set_defaults(bench_func=_run)


def task_prompts(tokenizer: Any, n: int, task: str = "copy") -> list[list[int]]:
    """``n`` chat prompts of ``task`` (a key of :data:`TASKS`) over the passages (token ids, chat template
    applied)."""
    templates = TASKS[task]
    out = []
    for i in range(n):
        passage = PASSAGES[i % len(PASSAGES)]
        text = templates[(i // len(PASSAGES)) % len(templates)].format(
            text=passage, typos=with_typos(passage)
        )
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        out.append(tokenizer.encode(chat, add_special_tokens=False))
    return out


def with_typos(text: str, every: int = 5) -> str:
    """``text`` with two inner letters swapped in every ``every``-th word of five letters or more.

    >>> with_typos("alpha bravo charlie delta echoes foxtrot", every=2)
    'alpha barvo charlie dleta echoes fotxrot'
    """
    words = text.split(" ")
    for i in range(every - 1, len(words), every):
        w = words[i]
        if len(w) >= 5 and w.isalpha():
            k = len(w) // 2
            words[i] = w[: k - 1] + w[k] + w[k - 1] + w[k + 1 :]
    return " ".join(words)


def _round(engine: Any, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, float, list[dict]]:
    """Each prompt alone, streamed: (decode seconds, wall seconds, results)."""
    params = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
    decode_s, results = 0.0, []
    t_start = time.perf_counter()
    for ids in prompts:
        t_first = None
        tokens: list[int] = []
        meta: dict[str, Any] = {}
        for chunk in engine.generate(input_ids=ids, sampling_params=params, stream=True):
            if t_first is None and chunk["output_ids"]:
                t_first = time.perf_counter()
            tokens.extend(chunk["output_ids"])
            meta = chunk["meta_info"]
        decode_s += time.perf_counter() - (t_first or time.perf_counter())
        results.append({"output_ids": tokens, "meta_info": meta})
    return decode_s, time.perf_counter() - t_start, results


def _result(mode: str, decode_s: float, wall_s: float, results: list[dict], stats: dict) -> ModeResult:
    tokens = [len(r["output_ids"]) for r in results]
    return ModeResult(
        mode=mode,
        requests=len(results),
        output_tokens=sum(tokens),
        decode_tokens=sum(max(0, n - 1) for n in tokens),
        decode_s=decode_s,
        wall_s=wall_s,
        verify_steps=stats.get("spec_verify_steps", 0),
        accept_length=stats.get("spec_accept_length", 0.0),
        accept_rate=stats.get("spec_accept_rate", 0.0),
    )


def run_speculative(args: EngineArgs, num_prompts: int, max_new_tokens: int, rounds: int, task: str = "copy"):
    """Both modes on ``task``'s prompts, ``rounds`` alternating timed rounds after one warm-up each. Returns (run
    info, [off, on], whether the greedy outputs were identical)."""
    import sgl_ray

    spec_fields = {f.name for f in fields(EngineArgs) if f.name.startswith("speculative_")}
    options = {k: v for k, v in asdict(args).items() if v is not None}
    off = {k: v for k, v in options.items() if k not in spec_fields}
    on = {**options, "speculative_algorithm": args.speculative_algorithm or "NGRAM"}
    with sgl_ray.Engine(**off) as plain, sgl_ray.Engine(**on) as spec:
        run = RunInfo(
            model=plain.model_path,
            dtype=str(plain.model_config.dtype).removeprefix("torch."),
            engine_args={k: v for k, v in on.items() if k != "model_path"},
        )
        prompts = task_prompts(plain.tokenizer, num_prompts, task)
        engines = {"off": plain, on["speculative_algorithm"]: spec}
        best: dict[str, ModeResult] = {}
        outputs: dict[str, list[list[int]]] = {}
        for engine in engines.values():
            _round(engine, prompts[:1], 8)  # warm-up
        for _ in range(rounds):
            for mode, engine in engines.items():
                engine.flush_cache()
                before = engine.get_stats()
                decode_s, wall_s, results = _round(engine, prompts, max_new_tokens)
                stats = _delta(before, engine.get_stats())
                r = _result(mode, decode_s, wall_s, results, stats)
                outputs[mode] = [x["output_ids"] for x in results]
                if mode not in best or r.decode_s < best[mode].decode_s:
                    best[mode] = r
    off_out, on_out = outputs.values()
    return run, list(best.values()), off_out == on_out


def _delta(before: dict, after: dict) -> dict:
    """The speculative counters of one round (the engine's are cumulative)."""
    steps = after.get("spec_verify_steps", 0) - before.get("spec_verify_steps", 0)
    if not steps:
        return {}
    emitted = after["spec_emitted_tokens"] - before["spec_emitted_tokens"]
    proposed = after["spec_proposed_drafts"] - before["spec_proposed_drafts"]
    accepted = after["spec_accepted_drafts"] - before["spec_accepted_drafts"]
    return {
        "spec_verify_steps": steps,
        "spec_accept_length": emitted / steps,
        "spec_accept_rate": accepted / proposed if proposed else 0.0,
    }


def format_speculative(results: list[ModeResult], identical: bool) -> str:
    off = results[0]
    lines = [
        f"{'mode':<11} | {'requests':>8} | {'out tok':>7} | {'decode tok/s':>12} | {'speed-up':>8} | "
        f"{'verify steps':>12} | {'accept len':>10} | accept rate",
        "-" * 100,
    ]
    for r in results:
        lines.append(
            f"{r.mode:<11} | {r.requests:>8} | {r.output_tokens:>7} | {r.decode_tok_s:>12.1f} | "
            f"{r.decode_tok_s / off.decode_tok_s:>7.2f}x | {r.verify_steps:>12} | {r.accept_length:>10.2f} | "
            f"{r.accept_rate:.2f}"
        )
    lines.append("greedy outputs identical: " + ("yes" if identical else "NO"))
    return "\n".join(lines)


def _run(ns: argparse.Namespace) -> int:
    args = EngineArgs.from_cli_args(ns)
    tasks = [t.strip() for t in ns.task.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SystemExit(f"--task: {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}")
    failed = False
    for task in tasks:
        run, results, identical = run_speculative(args, ns.num_prompts, ns.max_new_tokens, ns.rounds, task)
        record = run.record(
            f"speculative-{task}",
            {"num_prompts": ns.num_prompts, "max_new_tokens": ns.max_new_tokens, "rounds": ns.rounds},
            modes={r.mode: r.to_dict() for r in results},
            identical=identical,
        )
        write_jsonl(ns.output_file, [record])
        print(format_header(run))
        print(f"task: {task}")
        print(format_speculative(results, identical))
        failed |= not identical
    print(f"{len(tasks)} record{'s' if len(tasks) > 1 else ''} appended to {ns.output_file}")
    return 1 if failed else 0
