"""Prefix ordering in the Ray Data processor, measured: one shared-prefix job run with ``order_by_prefix`` off
(input order), on (each window of rows sorted by prompt, the default) and after Ray Data's global sort (an
all-to-all exchange that must finish before generation starts).

Rows come from ``--families`` prompt families, interleaved (a, b, c, …, a, b, c, …), each a long shared prefix and a
short question of its own; a preprocess step adds the sampling parameters, as in a real pipeline. Prints one line
per run and a JSON record per run to ``--output-file``.

Run (results in docs/ray-data.md)::

    .venv/bin/python examples/bench_ray_data_ordering.py --rows 64 --repeat 3 --num-cpus 4   # SmolLM2, text
    .venv/bin/python examples/bench_ray_data_ordering.py --rows 10000 --tiny --families 32 \
        --max-total-tokens 4096 --num-cpus 4                                           # random Llama, token ids
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from sgl_ray.deployments.data import ProcessorConfig, build_processor, prompt_key

VARIANTS = ("off", "on", "global-sort")
TOPICS = ("apples", "rivers", "engines", "violins", "glaciers", "tulips", "comets", "harbors")


def tiny_model(directory: Path) -> str:
    """A small Llama config with random weights (``load_format="dummy"``): token-id prompts, no tokenizer."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2000,
        max_position_embeddings=2048,
    ).save_pretrained(directory)
    return str(directory)


def rows(n: int, families: int, prefix_len: int, tiny: bool) -> list[dict[str, Any]]:
    """``n`` rows of ``families`` interleaved prompt families: a ~``prefix_len``-token prefix and a question."""
    rng = random.Random(0)
    if tiny:
        prefixes = [[rng.randrange(3, 2000) for _ in range(prefix_len)] for _ in range(families)]
        return [
            {"id": i, "input_ids": prefixes[i % families] + [rng.randrange(3, 2000) for _ in range(8)]}
            for i in range(n)
        ]
    topics = [TOPICS[f % len(TOPICS)] + ("" if f < len(TOPICS) else f" {f}") for f in range(families)]
    facts = [
        " ".join(
            f"Fact {k} about {t}: it is number {k * 7 + len(t)} on the list." for k in range(prefix_len // 16)
        )
        for t in topics
    ]
    return [
        {
            "id": i,
            "prompt": f"Notes on {topics[i % families]}. {facts[i % families]}\nQuestion {i}: which fact?",
        }
        for i in range(n)
    ]


def with_params(row: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    """The preprocess step (a pipeline has one: here it adds the sampling parameters)."""
    return {**row, "sampling_params": {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}}


def run_once(
    variant: str, items: list[dict], config: ProcessorConfig, blocks: int | None, new_tokens: int
) -> dict[str, Any]:
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    if variant == "global-sort":
        key = "__key"
        ds = ds.map(lambda r: {**r, key: prompt_key(r)}).sort(key).drop_columns([key])
    processor = build_processor(
        dataclasses.replace(config, order_by_prefix=variant == "on"),
        preprocess=functools.partial(with_params, new_tokens=new_tokens),
    )
    started = time.perf_counter()
    out = processor(ds).take_all()
    wall = time.perf_counter() - started
    assert len(out) == len(items)
    return {
        "variant": variant,
        "wall_s": round(wall, 2),
        "rows_per_s": round(len(out) / wall, 1),
        "cached_tokens": sum(r["num_cached_tokens"] for r in out),
        "prompt_tokens": sum(r["num_input_tokens"] for r in out),
        "in_input_order": [r["id"] for r in out] == [r["id"] for r in items],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--families", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=256, help="shared prefix tokens per family (about)")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-total-tokens", type=int, default=8192, help="each engine's KV pool (tokens)")
    p.add_argument("--blocks", type=int, default=None, help="input blocks (default: Ray Data's choice)")
    p.add_argument("--tiny", action="store_true", help="a small random-weight Llama and token-id prompts")
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant (variants alternate)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--num-cpus", type=int, default=None, help="ray.init(num_cpus=...)")
    p.add_argument("--output-file", default=None, help="append one JSON record per run")
    args = p.parse_args()

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        engine: dict[str, Any] = {"max_total_tokens": args.max_total_tokens}
        if args.tiny:
            engine |= {
                "model_path": tiny_model(Path(tmp)),
                "load_format": "dummy",
                "skip_tokenizer_init": True,
            }
        elif args.model_path:
            engine["model_path"] = args.model_path
        config = ProcessorConfig(
            engine_kwargs=engine, batch_size=args.batch_size, concurrency=args.concurrency, log_interval_s=0
        )
        items = rows(args.rows, args.families, args.prefix_len, args.tiny)
        run_once(
            "off", items[: args.batch_size], config, None, args.new_tokens
        )  # Ray Data's start-up, once for all variants
        if "global-sort" in args.variants:
            ray.data.from_items(items[:64]).map(lambda r: r).sort("id").take_all()  # and its sort's
        variants = args.variants
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.repeat):
            for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:
                res = run_once(variant, items, config, args.blocks, args.new_tokens)
                res |= {"rows": args.rows, "families": args.families, "prefix_len": args.prefix_len}
                res |= {
                    "model": "tiny-llama-dummy" if args.tiny else (args.model_path or "SmolLM2-135M (GGUF)")
                }
                res |= {"machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
                print(json.dumps(res), flush=True)
                results[variant].append(res)
                if args.output_file:
                    with open(args.output_file, "a") as f:
                        f.write(json.dumps(res) + "\n")
        print(
            f"\n{args.rows} rows, {args.families} families x ~{args.prefix_len} tokens, median of {args.repeat}:"
        )
        for v, rs in results.items():
            wall = statistics.median(r["wall_s"] for r in rs)
            print(
                f"  {v:12s} {wall:7.2f} s   cached {rs[0]['cached_tokens']:>9,} / {rs[0]['prompt_tokens']:,}"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
