"""``sgl-ray bench roofline``: the engine against the roofline floor (:mod:`sgl_ray.bench.roofline`) and transformers.

Workloads (random token ids, greedy, every request runs to its full output length):

- ``bs1``: one request, ``bs1_input_len`` in; decode speed = (new tokens - 1) / (time after the first token).
- ``offline N:IN:OUT`` (repeatable): N requests submitted at once.
- ``shared-prefix N:PREFIX:SUFFIX:OUT``: N requests sharing a PREFIX-token prefix, radix cache on, then off (the
  floor counts the prefix once: :func:`~sgl_ray.bench.roofline.shared_prefix_floor_s`).
- transformers ``generate`` in the same run: batch 1 (``bs1`` sizes) and one static batch ``hf_batch``.
- with ``ray``: ``bs1`` again through the Ray actors (a scheduler actor driving a shard actor), after the
  in-process engine has released the device.
- with ``baseline``: ``bs1`` and the offline batches again on the same model unquantized (``quantization="none"``,
  ``kv_cache_dtype="auto"``), system ``sgl_ray <dtype>``, so a quantized run has its float numbers from the same
  call and card.

The floors count the weights as the engine holds them (:meth:`~sgl_ray.bench.roofline.ModelCost.from_model`:
quantized projections at their encoded size) and the KV cache at its ``kv_cache_dtype``; the report and every
record name the format (``weight_format``, ``quantization``, ``kv_cache_dtype``) and the bytes by kind of layer.

The device's copy bandwidth and matmul rate are measured at the start of the same run; each row reports the
roofline floor and the fraction of it achieved, also against the phased floor (GEMM and attention phases bounded
one by one and added); a fraction above 1.0 is printed only with a warning. ``bs1`` rows also report the share of
time the device waited between decode steps (CUDA only: absent on a CPU).

Example (on a GPU, with a config-only model directory and random weights)::

    sgl-ray bench roofline --model-path /tmp/llama8b --load-format dummy --skip-tokenizer-init \\
        --offline 1000:1024:1024 --offline 1000:4096:128 --shared-prefix 256:2048:64:128 --hf-batch 64:512:256
    sgl-ray bench roofline --model-path /tmp/llama8b --load-format dummy --skip-tokenizer-init \\
        --quantization awq --baseline --skip-hf --offline 1000:1024:1024   # INT4 at load, bf16 in the same call
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sgl_ray.bench.roofline import (
    ABOVE_FLOOR,
    DeviceRates,
    ModelCost,
    decode_floor_tok_s,
    describe_cost,
    format_fraction,
    max_batch_for,
    measure_device,
    prefill_s,
    shared_prefix_floor_s,
    workload_floor_s,
)
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.entrypoints.engine import Engine
from sgl_ray.runner.trace import gpu_idle_fraction, phase_times


@dataclass(frozen=True)
class RooflineConfig:
    bs1_input_len: int = 128
    bs1_output_len: int = 256
    offline: tuple[tuple[int, int, int], ...] = ()
    shared_prefix: tuple[int, int, int, int] | None = None
    hf_batch: tuple[int, int, int] | None = None
    skip_hf: bool = False
    seed: int = 0
    ray: bool = False
    baseline: bool = False  # bs1 and offline again with quantization="none", kv_cache_dtype="auto"


@dataclass(frozen=True)
class Row:
    workload: str
    system: str
    output_tokens: int
    wall_s: float
    tok_s: float
    floor_tok_s: float | None = None
    cached_tokens: int | None = None
    gpu_idle: float | None = None  # device idle share between decode steps (bs1 rows on CUDA)
    phased_floor_tok_s: float | None = None  # the floor with GEMM and attention phases added (see roofline)
    # offline rows on CUDA, in-process: device seconds in prefill and decode steps, idle between steps, and the
    # (phased) floors of the two phases
    phases: dict[str, float] | None = None

    @property
    def fraction(self) -> float | None:
        return self.tok_s / self.floor_tok_s if self.floor_tok_s else None

    @property
    def phased_fraction(self) -> float | None:
        return self.tok_s / self.phased_floor_tok_s if self.phased_floor_tok_s else None

    @property
    def above_floor(self) -> bool:
        """Faster than a floor allows: the floor's model of this workload is wrong (reported with a warning)."""
        return any(f is not None and f > 1.0 for f in (self.fraction, self.phased_fraction))


def _prompts(rng: random.Random, vocab: int, num: int, length: int) -> list[list[int]]:
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(num)]


def _greedy(out_len: int) -> dict:
    return {"temperature": 0.0, "max_new_tokens": out_len, "ignore_eos": True}


def _bs1(engine: Engine, prompt: list[int], out_len: int) -> tuple[float, float, float | None]:
    """Returns (decode tok/s after the first token, total seconds, GPU idle share between decode steps): the
    in-process runner's step trace, or the shard actors' (``RayEngineCore.start_step_trace``)."""
    engine.generate(input_ids=[prompt[:8]], sampling_params=_greedy(8))  # warm-up
    core = engine._core
    runner = getattr(core, "runner", None)
    tracing = runner is not None and runner.device.type == "cuda"
    if tracing:
        runner.step_trace = []
    elif hasattr(core, "start_step_trace"):
        core.start_step_trace()
    start = time.perf_counter()
    first = None
    for _chunk in engine.generate(input_ids=prompt, sampling_params=_greedy(out_len), stream=True):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    idle = None
    if tracing:
        torch.cuda.synchronize()
        decode = [step for step in runner.step_trace if step.batch_size == 1][2:]  # past the prefill
        idle = gpu_idle_fraction(decode)
        runner.step_trace = None
    elif hasattr(core, "stop_step_trace"):
        idle = core.stop_step_trace(1, 2)  # None on a CPU
    return (out_len - 1) / (end - first), end - start, idle


def _warm_up(engine: Engine, prompts: list[list[int]]) -> None:
    """Untimed passes at the workload's own shapes, so that no kernel is compiled inside the timed run (Triton
    compiles a variant per specialisation: batch sizes, split counts, long prefixes): every prompt cut to 32
    tokens (prefill and decode at the full batch), then the first four at full length (long extends)."""
    engine.generate(input_ids=[p[:32] for p in prompts], sampling_params=_greedy(4))
    engine.generate(input_ids=prompts[:4], sampling_params=_greedy(4))


def _timed(
    engine: Engine, prompts: list[list[int]], out_len: int
) -> tuple[float, int, int, dict[str, float] | None]:
    """(wall s, output tokens, cached tokens, device seconds per phase: see ``phase_times``; None unless the
    engine runs in this process on CUDA)."""
    engine.flush_cache()
    _warm_up(engine, prompts)
    engine.flush_cache()
    runner = getattr(engine._core, "runner", None)
    tracing = runner is not None and runner.device.type == "cuda"
    if tracing:
        runner.step_trace = []
    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=_greedy(out_len))
    wall = time.perf_counter() - start
    phases = None
    if tracing:
        torch.cuda.synchronize()
        phases = phase_times(runner.step_trace)
        runner.step_trace = None
    n_out = sum(len(o["output_ids"]) for o in outs)
    return wall, n_out, sum(o["meta_info"]["cached_tokens"] for o in outs), phases


def _free_device_memory() -> None:
    """After the caller dropped its last reference to an engine: return its memory (weights, KV, graph pool)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _log(row: Row) -> None:
    idle = "" if row.gpu_idle is None else f", GPU idle {100 * row.gpu_idle:.1f}%"
    print(
        f"[roofline] {row.workload:<26} {row.system:<20} {row.tok_s:9.1f} tok/s{idle}",
        file=sys.stderr,
        flush=True,
    )
    if row.phases is not None:
        print(f"[roofline] {row.workload:<26} {format_phases(row.phases)}", file=sys.stderr, flush=True)
    if row.above_floor:
        print(f"[roofline] WARNING: {_above_floor(row)}", file=sys.stderr, flush=True)


def _above_floor(row: Row) -> str:
    plain, phased = format_fraction(row.fraction), format_fraction(row.phased_fraction)
    return f"{row.workload} / {row.system} ran at {plain} of its floor, {phased} of the phased one: {ABOVE_FLOOR}."


def format_phases(p: dict[str, float]) -> str:
    """Device time per phase against its phased floor, and the floor's share of that time."""
    return (
        f"prefill steps {p['prefill_s']:.1f} s on the device (floor {p['prefill_floor_s']:.1f} s, "
        f"{p['prefill_floor_s'] / max(p['prefill_s'], 1e-9):.2f}); decode steps {p['decode_s']:.1f} s "
        f"(floor {p['decode_floor_s']:.1f} s, {p['decode_floor_s'] / max(p['decode_s'], 1e-9):.2f}); "
        f"idle between steps {p['idle_s']:.1f} s"
    )


def engine_cost(engine: Engine, args: EngineArgs) -> ModelCost:
    """The roofline cost of a started engine: the weights as its in-process runner holds them, else (Ray actors)
    from the config and the quantization it asks for; the KV cache at its ``kv_cache_dtype``."""
    from sgl_ray.layers.quantization import checkpoint_quant_method

    config = engine.model_config
    kv_dtype = args.kv_cache_torch_dtype(config.dtype)
    runner = getattr(engine._core, "runner", None)
    if runner is not None and runner.shard.tp.world_size == 1 and runner.shard.pp_size == 1:
        return ModelCost.from_model(runner.model, config, kv_dtype)
    held = args.quantization or checkpoint_quant_method(config.hf_config)
    return ModelCost.from_config(config, None if held == "none" else held, kv_dtype)


def _engine_facts(engine: Engine, args: EngineArgs, cost: ModelCost) -> dict:
    runner = getattr(engine._core, "runner", None)
    info = runner.info if runner is not None else None
    return {
        "kv_token_capacity": info.num_slots if info else args.max_total_tokens or 0,
        "max_running_requests": info.max_reqs if info else args.max_running_requests or 256,
        "weight_GB": cost.total_weight_bytes / 1e9,
        **({"bs1_weight_GB": cost.step_weight_bytes(1) / 1e9} if cost.num_experts else {}),
        "quantization": getattr(runner, "quantization", None) if runner is not None else args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        **describe_cost(cost),
        "cuda_graphs": bool(runner is not None and runner.cuda_graphs is not None),
        "overlap": not args.disable_overlap_schedule and runner is not None,
    }


def _offline_rows(
    engine: Engine,
    cost: ModelCost,
    rates: DeviceRates,
    facts: dict,
    system: str,
    workloads: list[tuple[tuple[int, int, int], list[list[int]]]],
    add: Callable[[Row], None],
) -> None:
    for (num, inp, out), prompts in workloads:
        wall, n_out, _, phases = _timed(engine, prompts, out)
        batch = max_batch_for(facts["kv_token_capacity"], facts["max_running_requests"], inp, out)
        floor, phased = (workload_floor_s(cost, rates, num, inp, out, batch, phased=p) for p in (False, True))
        if phases is not None:
            phases["prefill_floor_s"] = prefill_s(cost, rates, num, inp, phased=True)
            phases["decode_floor_s"] = phased - phases["prefill_floor_s"]
        name = f"offline {num}x{inp}/{out}"
        add(
            Row(
                name,
                system,
                n_out,
                wall,
                n_out / wall,
                n_out / floor,
                phased_floor_tok_s=n_out / phased,
                phases=phases,
            )
        )


def run_roofline(
    args: EngineArgs, cfg: RooflineConfig, on_row: Callable[[dict, Row], None] | None = None
) -> tuple[DeviceRates, dict, list[Row]]:
    """Measure the device, run every workload on the engine (and transformers), return the rates, facts and rows.
    ``on_row(facts, row)`` sees each row as soon as it is measured (with ``baseline``, its rows come with the
    unquantized engine's facts; the returned facts hold those under ``"baseline"``)."""
    rng = random.Random(cfg.seed)
    engine = Engine(**dataclasses.asdict(args))
    device = args.torch_device()
    rates = measure_device(device, engine.model_config.dtype)
    cost = engine_cost(engine, args)
    facts = {
        "copy_GBps": rates.copy_bytes_per_s / 1e9,
        "matmul_TFLOPs": rates.matmul_flops_per_s / 1e12,
        **_engine_facts(engine, args, cost),
    }
    num_slots, max_reqs = facts["kv_token_capacity"], facts["max_running_requests"]
    vocab = engine.model_config.vocab_size
    rows: list[Row] = []

    def add(row: Row, row_facts: dict = facts) -> None:
        rows.append(row)
        _log(row)
        if on_row is not None:
            on_row(row_facts, row)

    bs1_prompt = _prompts(rng, vocab, 1, cfg.bs1_input_len)[0]
    bs1_name = f"bs1 {cfg.bs1_input_len}/{cfg.bs1_output_len}"
    ctx = cfg.bs1_input_len + cfg.bs1_output_len / 2
    bs1_floor = decode_floor_tok_s(cost, rates, 1, ctx)
    bs1_phased = decode_floor_tok_s(cost, rates, 1, ctx, phased=True)
    tok_s, wall, idle = _bs1(engine, bs1_prompt, cfg.bs1_output_len)
    facts["bs1_gpu_idle"] = idle
    add(Row(bs1_name, "sgl_ray", cfg.bs1_output_len, wall, tok_s, bs1_floor, None, idle, bs1_phased))
    offline = [((num, inp, out), _prompts(rng, vocab, num, inp)) for num, inp, out in cfg.offline]
    _offline_rows(engine, cost, rates, facts, "sgl_ray", offline, add)
    shared = None
    if cfg.shared_prefix is not None:
        num, plen, slen, out = cfg.shared_prefix
        prefix = _prompts(rng, vocab, 1, plen)[0]
        shared = [prefix + s for s in _prompts(rng, vocab, num, slen)]
        wall, n_out, cached, _ = _timed(engine, shared, out)
        floor, phased = (
            shared_prefix_floor_s(cost, rates, num, plen, slen, out, num_slots, max_reqs, phased=p)
            for p in (False, True)
        )
        name = f"shared-prefix {num}x({plen}+{slen})/{out}"
        add(Row(name, "sgl_ray", n_out, wall, n_out / wall, n_out / floor, cached, None, n_out / phased))
    engine.shutdown()
    del engine
    _free_device_memory()
    if shared is not None:
        assert cfg.shared_prefix is not None
        num, plen, slen, out = cfg.shared_prefix
        off = Engine(**dataclasses.asdict(args.replace(disable_radix_cache=True)))
        wall, n_out, cached, _ = _timed(off, shared, out)
        add(Row(f"shared-prefix {num}x({plen}+{slen})/{out}", "sgl_ray radix off", n_out, wall, n_out / wall))
        off.shutdown()
        del off
        _free_device_memory()
    if cfg.baseline:
        base_args = args.replace(quantization="none", kv_cache_dtype="auto")
        base = Engine(**dataclasses.asdict(base_args))
        try:
            base_cost = engine_cost(base, base_args)
            base_facts = {**facts, **_engine_facts(base, base_args, base_cost)}
            facts["baseline"] = base_facts
            system = f"sgl_ray {base_cost.weight_format}"
            floors = (decode_floor_tok_s(base_cost, rates, 1, ctx, phased=p) for p in (False, True))
            base_floor, base_phased = floors
            tok_s, wall, idle = _bs1(base, bs1_prompt, cfg.bs1_output_len)
            base_facts["bs1_gpu_idle"] = idle
            row = Row(bs1_name, system, cfg.bs1_output_len, wall, tok_s, base_floor, None, idle, base_phased)
            add(row, base_facts)
            _offline_rows(base, base_cost, rates, base_facts, system, offline, lambda r: add(r, base_facts))
        finally:
            base.shutdown()
        del base
        _free_device_memory()
    if cfg.ray:
        # The device as this process sees it: the actors then ask Ray for what it names.
        ray_args = args.replace(use_ray=True, device=str(args.torch_device()))
        ray_engine = Engine(**dataclasses.asdict(ray_args))
        try:
            tok_s, wall, idle = _bs1(ray_engine, bs1_prompt, cfg.bs1_output_len)
        finally:
            ray_engine.shutdown()
        add(
            Row(
                bs1_name,
                "sgl_ray ray actors",
                cfg.bs1_output_len,
                wall,
                tok_s,
                bs1_floor,
                None,
                idle,
                bs1_phased,
            )
        )
    if not cfg.skip_hf:
        _hf_rows(args, cfg, bs1_prompt, bs1_floor, rng, vocab, add)
    return rates, facts, rows


def _hf_rows(args, cfg, bs1_prompt, bs1_floor, rng, vocab, add) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from sgl_ray.bench.hf_baseline import HFBaseline
    from sgl_ray.model_loader import resolve_model

    device = args.torch_device()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    if args.load_format == "dummy":
        config = AutoConfig.from_pretrained(args.model_path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        hf = HFBaseline(model, 0, device)
    else:
        hf = HFBaseline.load(str(resolve_model(args.model_path).local_dir), dtype=dtype, device=device)
    hf.warm_up()
    res = hf.run("transformers", [bs1_prompt], cfg.bs1_output_len, 1)
    add(
        Row(f"bs1 {cfg.bs1_input_len}/{cfg.bs1_output_len}", "transformers", res.output_tokens, res.wall_s,
            res.output_tok_s, bs1_floor)
    )  # fmt: skip
    if cfg.hf_batch is not None:
        num, inp, out = cfg.hf_batch
        res = hf.run("transformers", _prompts(rng, vocab, num, inp), out, num)
        add(Row(f"batch {num}x{inp}/{out}", "transformers", res.output_tokens, res.wall_s, res.output_tok_s))


def _weights(facts: dict) -> str:
    """``weights 4.93 GB as held (AWQ + bfloat16, quantization=awq; KV fp8_e4m3, 65536 B/token)``."""
    text = f"weights {facts['weight_GB']:.2f} GB"
    if facts.get("weight_format"):
        text += f" as held ({facts['weight_format']}, quantization={facts.get('quantization') or 'none'})"
        text += f", {facts['step_weight_bytes'] / 1e9:.2f} GB read per bs1 step"
    if facts.get("kv_bytes_per_token"):
        text += f"; KV {facts.get('kv_cache_dtype', 'auto')}, {facts['kv_bytes_per_token']:.0f} B/token"
    return text


def format_roofline(rates: DeviceRates, facts: dict, rows: list[Row]) -> str:
    head = (
        f"device: copy {facts['copy_GBps']:.0f} GB/s, matmul {facts['matmul_TFLOPs']:.1f} TFLOP/s; "
        f"{_weights(facts)}; KV capacity {facts['kv_token_capacity']} tokens; "
        f"CUDA graphs {'on' if facts['cuda_graphs'] else 'off'}, overlap {'on' if facts['overlap'] else 'off'}"
    )
    if facts.get("bs1_gpu_idle") is not None:
        head += f"; bs1 GPU idle between decode steps {100 * facts['bs1_gpu_idle']:.1f}%"
    base = facts.get("baseline")
    if base is not None:
        head += f"\nbaseline: {_weights(base)}; KV capacity {base['kv_token_capacity']} tokens"
    lines = [
        head,
        "| workload | system | output tok/s | roofline tok/s | of roofline | of phased floor | wall s | cached tokens "
        "| GPU idle |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        floor = f"{r.floor_tok_s:.0f}" if r.floor_tok_s else "-"
        frac, phased = format_fraction(r.fraction), format_fraction(r.phased_fraction)
        cached = "-" if r.cached_tokens is None else str(r.cached_tokens)
        idle = "-" if r.gpu_idle is None else f"{100 * r.gpu_idle:.1f}%"
        lines.append(
            f"| {r.workload} | {r.system} | {r.tok_s:.1f} | {floor} | {frac} | {phased} | {r.wall_s:.1f} | {cached} "
            f"| {idle} |"
        )
    lines += [f"- {r.workload}: {format_phases(r.phases)}" for r in rows if r.phases is not None]
    lines += [f"- WARNING: {_above_floor(r)}" for r in rows if r.above_floor]
    return "\n".join(lines)


def to_record(facts: dict, row: Row) -> str:
    return json.dumps(
        {
            **{k: v for k, v in facts.items() if k != "baseline"},
            **dataclasses.asdict(row),
            "fraction": row.fraction,
            "phased_fraction": row.phased_fraction,
            "above_floor": row.above_floor,
        }
    )
