"""``sgl-ray bench structured``: JSON-schema generation, unconstrained vs constrained vs constrained with
jump-forward, on the in-process engine.

Every mode runs the same prompts. The constrained modes decode under a JSON schema whose keys and punctuation
are long forced spans; the unconstrained mode generates exactly as many tokens per request as the constrained run
did (``ignore_eos``), so tokens/s and the per-token cost compare like for like. Each mode runs once untimed first
(warm-up; grammars compile and are cached), then ``--repeats`` timed runs (the best is reported).

Example::

    sgl-ray bench structured --num-prompts 16 --device cpu
    sgl-ray bench structured --device cuda --num-prompts 8 128 --output-file structured.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sgl_ray.bench.report import RunInfo, format_header, write_jsonl
from sgl_ray.configs.engine_args import EngineArgs

_ENUM = {"type": "string", "enum": ["pending", "processing", "shipped", "delivered", "cancelled"]}
# Strings are bounded with a pattern, not ``maxLength``: xgrammar (0.2.8) fills a mask inside a ``maxLength`` string
# in about 1 ms on average (tens of ms at worst), some 50x the cost of the same state under a bounded pattern.
_NAME = {"type": "string", "pattern": "[A-Z][a-z]{1,11}"}


def _object(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "an online order",
        _object(
            {
                "customer_first_name": _NAME,
                "customer_last_name": _NAME,
                "order_status": _ENUM,
                "total_amount_in_dollars": {"type": "integer", "minimum": 0, "maximum": 10000},
                "is_gift_wrapped": {"type": "boolean"},
                "shipping_address": _object(
                    {
                        "street_name": _NAME,
                        "city_name": _NAME,
                        "postal_code": {"type": "string", "pattern": "[0-9]{5}"},
                    }
                ),
            }
        ),
    ),
    (
        "a weather observation",
        _object(
            {
                "station_identifier": {"type": "string", "pattern": "[A-Z]{4}"},
                "temperature_in_celsius": {"type": "integer", "minimum": -60, "maximum": 60},
                "relative_humidity_percent": {"type": "integer", "minimum": 0, "maximum": 100},
                "sky_condition": {"enum": ["clear", "partly cloudy", "overcast", "rain", "snow"]},
                "wind": _object(
                    {
                        "speed_in_km_per_hour": {"type": "integer", "minimum": 0, "maximum": 300},
                        "direction": {"enum": ["north", "east", "south", "west"]},
                    }
                ),
            }
        ),
    ),
    (
        "an employee record",
        _object(
            {
                "employee_full_name": _NAME,
                "department_name": {"enum": ["engineering", "marketing", "sales", "finance"]},
                "years_of_experience": {"type": "integer", "minimum": 0, "maximum": 50},
                "is_remote_worker": {"type": "boolean"},
                "programming_languages": {
                    "type": "array",
                    "items": {"enum": ["python", "rust", "go"]},
                    "maxItems": 3,
                },
            }
        ),
    ),
]


@dataclass
class ModeResult:
    mode: str
    requests: int
    output_tokens: int
    seconds: float
    decode_steps: int
    jump_forward_tokens: int
    valid_json: int

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / self.output_tokens

    @property
    def steps_per_request(self) -> float:
        return self.decode_steps / self.requests

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tok_s": self.tok_s, "steps_per_request": self.steps_per_request}


def add_structured_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "structured",
        help="JSON-schema generation: unconstrained vs constrained vs constrained with jump-forward",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    EngineArgs.add_cli_args(p)
    p.add_argument(
        "--num-prompts",
        type=int,
        nargs="+",
        default=[16],
        help="requests per run, submitted at once (schemas cycle); several values: one run per batch size",
    )
    p.add_argument("--max-new-tokens", type=int, default=160, help="token limit of each request")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per mode (the fastest is reported)")
    p.add_argument(
        "--output-file", default="bench_structured.jsonl", help="JSONL file the record is appended to"
    )
    p.set_defaults(bench_func=_run)


def _time(engine, prompts: list[str], params: list[dict], repeats: int) -> tuple[float, list[dict]]:
    engine.generate(prompts, params)  # warm-up: grammars compile, caches fill
    best, outs = float("inf"), []
    for _ in range(repeats):
        engine.flush_cache()
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        best = min(best, time.perf_counter() - t0)
    return best, outs


def _result(mode: str, seconds: float, outs: list[dict]) -> ModeResult:
    """``valid_json`` counts outputs that parse as a JSON object (the constrained modes should give all)."""
    valid = 0
    for o in outs:
        try:
            valid += isinstance(json.loads(o["text"]), dict)
        except ValueError:
            pass
    return ModeResult(
        mode=mode,
        requests=len(outs),
        output_tokens=sum(o["meta_info"]["completion_tokens"] for o in outs),
        seconds=seconds,
        decode_steps=sum(o["meta_info"]["decode_steps"] for o in outs),
        jump_forward_tokens=sum(o["meta_info"]["jump_forward_tokens"] for o in outs),
        valid_json=valid,
    )


def run_structured(
    args: EngineArgs, num_prompts: int | Sequence[int], max_new_tokens: int, repeats: int
) -> tuple[RunInfo, dict[int, list[ModeResult]]]:
    """Run the three modes at each batch size in ``num_prompts`` (all requests of a run are submitted at once;
    one engine per jump-forward setting serves every size). Returns the run info and, per size, one result per
    mode: unconstrained, constrained, constrained + jump-forward."""
    import sgl_ray

    sizes = [num_prompts] if isinstance(num_prompts, int) else list(num_prompts)
    work = {}
    for n in sizes:
        picks = [SCHEMAS[i % len(SCHEMAS)] for i in range(n)]
        prompts = [f"Request {i}: write {desc} as JSON.\n" for i, (desc, _) in enumerate(picks)]
        constrained = [
            {"temperature": 0.0, "max_new_tokens": max_new_tokens, "json_schema": s} for _, s in picks
        ]
        work[n] = prompts, constrained
    results: dict[int, list[ModeResult]] = {}
    with sgl_ray.Engine(**{**_fields(args), "disable_jump_forward": True}) as eng:
        run = RunInfo(
            model=eng.model_path,
            dtype=str(eng.model_config.dtype).removeprefix("torch."),
            engine_args=_fields(args),
        )
        for n, (prompts, constrained) in work.items():
            secs, outs = _time(eng, prompts, constrained, repeats)
            constrained_result = _result("constrained", secs, outs)
            lengths = [o["meta_info"]["completion_tokens"] for o in outs]
            free = [{"temperature": 0.0, "max_new_tokens": k, "ignore_eos": True} for k in lengths]
            secs, outs = _time(eng, prompts, free, repeats)
            results[n] = [_result("unconstrained", secs, outs), constrained_result]
    with sgl_ray.Engine(**{**_fields(args), "disable_jump_forward": False}) as eng:
        for n, (prompts, constrained) in work.items():
            secs, outs = _time(eng, prompts, constrained, repeats)
            results[n].append(_result("constrained+jump-forward", secs, outs))
    return run, results


def _fields(args: EngineArgs) -> dict[str, Any]:
    return {k: v for k, v in asdict(args).items() if v is not None and k != "disable_jump_forward"}


def format_structured(results: list[ModeResult]) -> str:
    base = results[0]
    lines = [
        f"{'mode':<26} | {'out tok':>7} | {'time s':>7} | {'tok/s':>8} | {'ms/tok':>7} | {'vs free':>7} | "
        f"{'steps/req':>9} | {'jumped':>6} | valid",
        "-" * 104,
    ]
    for r in results:
        lines.append(
            f"{r.mode:<26} | {r.output_tokens:>7} | {r.seconds:>7.2f} | {r.tok_s:>8.1f} | {r.ms_per_token:>7.2f} | "
            f"{r.ms_per_token / base.ms_per_token:>6.2f}x | {r.steps_per_request:>9.1f} | {r.jump_forward_tokens:>6} | "
            f"{r.valid_json}/{r.requests}"
        )
    step, jump = results[1], results[2]
    lines.append(
        f"decode steps: {step.decode_steps} step by step vs {jump.decode_steps} with jump-forward "
        f"= {step.decode_steps / max(jump.decode_steps, 1):.2f}x fewer"
    )
    return "\n".join(lines)


def _run(ns: argparse.Namespace) -> int:
    run, by_size = run_structured(EngineArgs.from_cli_args(ns), ns.num_prompts, ns.max_new_tokens, ns.repeats)
    records = [
        run.record(
            "structured-json",
            {"num_prompts": n, "max_new_tokens": ns.max_new_tokens, "repeats": ns.repeats},
            modes={r.mode: r.to_dict() for r in results},
        )
        for n, results in by_size.items()
    ]
    write_jsonl(ns.output_file, records)
    print(format_header(run))
    for n, results in by_size.items():
        print(f"\n{n} prompts at once")
        print(format_structured(results))
    print(f"{len(records)} record(s) appended to {ns.output_file}")
    return 0
