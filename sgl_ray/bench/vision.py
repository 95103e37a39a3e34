"""``sgl-ray bench vision``: image requests on a Qwen2-VL / Qwen2.5-VL model, and transformers in the same run.

``--num-prompts`` requests, each one random-noise image of ``--image-size`` square pixels and ``--text-len`` random
text tokens, ``--output-len`` new tokens each (greedy, ``ignore_eos``), all submitted at once. Three runs:

- ``distinct``: every request its own image (no cache can help);
- ``repeated``: the same requests again, prefix cache and image-embedding cache kept: every image and prompt is
  served from the caches;
- ``transformers``: ``generate`` in static batches of ``--hf-batch-size`` on the same inputs, on the engine's
  device (skipped with ``--skip-hf``). Its weights are its own random ones: only the timing is compared.

Reported: wall time and output tok/s; on CUDA also the device time of the vision tower, of the other prefill work and
of decode steps (the engine's step trace).

Example::

    sgl-ray bench vision --model-path /models/qwen2.5-vl-7b-shape --load-format dummy --skip-tokenizer-init \\
        --dtype bfloat16 --num-prompts 64 --image-size 1024 --text-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sgl_ray.bench.report import RunInfo, format_header, write_jsonl
from sgl_ray.configs.engine_args import EngineArgs


@dataclass
class VisionRow:
    run: str
    requests: int
    output_tokens: int
    wall_s: float
    cached_tokens: int = 0
    tower_s: float | None = None  # device seconds in the vision tower
    prefill_s: float | None = None  # device seconds of the other prefill / mixed steps (tower excluded)
    decode_s: float | None = None  # device seconds of decode steps

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "output_tok_s": self.output_tok_s}


def add_vision_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vision",
        help="image requests (vision tower, prefill, decode; the image cache) and transformers, side by side",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    EngineArgs.add_cli_args(p)
    p.add_argument("--num-prompts", type=int, default=64, help="requests, submitted at once")
    p.add_argument("--image-size", type=int, default=1024, help="side of each square image, in pixels")
    p.add_argument("--text-len", type=int, default=128, help="random text tokens after the image")
    p.add_argument("--output-len", type=int, default=128, help="new tokens of every request")
    p.add_argument("--hf-batch-size", type=int, default=8, help="static batch size of the transformers run")
    p.add_argument("--skip-hf", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and texts")
    p.add_argument("--output-file", default="bench_vision.jsonl", help="JSONL file the record is appended to")
    p.set_defaults(bench_func=_run)


def noise_images(n: int, size: int, seed: int) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def image_prompts(hf_config: Any, n: int, text_len: int, seed: int) -> list[list[int]]:
    """``<vision_start><image_pad><vision_end>`` + ``text_len`` random ordinary token ids, ``n`` times."""
    rng = random.Random(seed)
    head = [hf_config.vision_start_token_id, hf_config.image_token_id, hf_config.vision_end_token_id]
    top = min(int(getattr(hf_config, "vocab_size", 0) or hf_config.text_config.vocab_size), 150000)
    return [head + [rng.randrange(100, top) for _ in range(text_len)] for _ in range(n)]


def _timed_run(
    engine: Any, name: str, prompts: list[list[int]], images: list[Any], out_len: int
) -> VisionRow:
    runner = getattr(engine._core, "runner", None)
    cuda = runner is not None and runner.device.type == "cuda"
    if cuda:
        runner.step_trace = []
        runner.multimodal.tower_trace = []
    params = {"temperature": 0.0, "max_new_tokens": out_len, "ignore_eos": True}
    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params, image_data=[[im] for im in images])
    row = VisionRow(
        run=name,
        requests=len(outs),
        output_tokens=sum(len(o["output_ids"]) for o in outs),
        wall_s=time.perf_counter() - start,
        cached_tokens=sum(o["meta_info"]["cached_tokens"] for o in outs),
    )
    if cuda:
        import torch

        from sgl_ray.runner.trace import phase_times

        torch.cuda.synchronize()
        phases = phase_times(runner.step_trace)
        tower = sum(s.elapsed_time(e) for s, e in runner.multimodal.tower_trace) / 1e3
        row.tower_s, row.prefill_s, row.decode_s = tower, phases["prefill_s"] - tower, phases["decode_s"]
        runner.step_trace = runner.multimodal.tower_trace = None
    return row


def _hf_run(
    args: EngineArgs,
    processor: Any,
    prompts: list[list[int]],
    images: list[Any],
    out_len: int,
    batch: int,
    device: str,
) -> VisionRow:
    """transformers ``generate`` (its own random weights, the engine's dtype) on the same expanded prompts and
    pixels, in static batches (every prompt has the same length here: no padding)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(args.model_path)
    default = torch.bfloat16 if device == "cuda" else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype not in (None, "auto") else default
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
    inputs = [processor.process(ids, [im]) for ids, im in zip(prompts, images, strict=True)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    n_out = 0
    for i in range(0, len(inputs), batch):
        part = inputs[i : i + batch]
        ids = torch.tensor([p[0] for p in part], device=device)
        pixels = torch.from_numpy(np.concatenate([p[1].images[0].pixel_values for p in part])).to(
            device, dtype
        )
        grids = torch.tensor([p[1].images[0].grid_thw for p in part], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=pixels,
                image_grid_thw=grids,
                max_new_tokens=out_len,
                min_new_tokens=out_len,
                do_sample=False,
            )
        n_out += (out.shape[1] - ids.shape[1]) * out.shape[0]
    sync()
    row = VisionRow(
        run="transformers", requests=len(inputs), output_tokens=n_out, wall_s=time.perf_counter() - start
    )
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def run_vision(
    args: EngineArgs,
    num_prompts: int,
    image_size: int,
    text_len: int,
    output_len: int,
    hf_batch: int | None = 8,
    seed: int = 0,
) -> tuple[RunInfo, list[VisionRow]]:
    import sgl_ray

    options = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    rows: list[VisionRow] = []
    with sgl_ray.Engine(**options) as engine:
        if engine.image_processor is None:
            raise SystemExit("bench vision: the model takes no images")
        hf_config = engine.model_config.hf_config
        run = RunInfo(
            model=engine.model_path,
            dtype=str(engine.model_config.dtype).removeprefix("torch."),
            engine_args={k: v for k, v in options.items() if k != "model_path"},
        )
        prompts = image_prompts(hf_config, num_prompts, text_len, seed)
        images = noise_images(num_prompts, image_size, seed)
        warm = noise_images(1, image_size, seed + 1)
        engine.generate(
            input_ids=prompts[0], sampling_params={"max_new_tokens": 4, "temperature": 0.0}, image_data=warm
        )
        engine.flush_cache()
        rows.append(_timed_run(engine, "distinct", prompts, images, output_len))
        rows.append(_timed_run(engine, "repeated", prompts, images, output_len))
        processor = engine.image_processor
        device = engine._core.runner.device.type
    gc.collect()
    if hf_batch:
        rows.append(_hf_run(args, processor, prompts, images, output_len, hf_batch, device))
    return run, rows


def format_vision(rows: list[VisionRow]) -> str:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = [
        f"{'run':<12} | {'requests':>8} | {'out tok':>7} | {'wall s':>7} | {'out tok/s':>9} | {'cached':>7} | "
        f"{'tower s':>7} | {'prefill s':>9} | decode s",
        "-" * 100,
    ]
    for r in rows:
        lines.append(
            f"{r.run:<12} | {r.requests:>8} | {r.output_tokens:>7} | {r.wall_s:>7.2f} | {r.output_tok_s:>9.1f} | "
            f"{r.cached_tokens:>7} | {s(r.tower_s):>7} | {s(r.prefill_s):>9} | {s(r.decode_s)}"
        )
    return "\n".join(lines)


def _run(ns: argparse.Namespace) -> int:
    args = EngineArgs.from_cli_args(ns)
    run, rows = run_vision(
        args,
        ns.num_prompts,
        ns.image_size,
        ns.text_len,
        ns.output_len,
        None if ns.skip_hf else ns.hf_batch_size,
        ns.seed,
    )
    record = run.record(
        "vision",
        {
            "num_prompts": ns.num_prompts,
            "image_size": ns.image_size,
            "text_len": ns.text_len,
            "output_len": ns.output_len,
        },
        runs={r.run: r.to_dict() for r in rows},
    )
    write_jsonl(ns.output_file, [record])
    print(format_header(run))
    print(format_vision(rows))
    print(f"1 record appended to {ns.output_file}")
    return 0
