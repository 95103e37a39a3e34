"""Multi-LoRA throughput: the same batch of requests with 1, 4, 16 … distinct adapters vs the base model.

One engine with ``max_loras_per_batch`` = the largest count serves every run, so all adapters of a run fit in one
batch. Adapters are random PEFT-format files written for the run (rank ``rank``, all seven target modules). Each
adapter run is timed right after a base-model run of the same prompts (the machines are noisy; only same-run
numbers are compared; with ``repeats`` the two alternate and the fastest run of each counts); every adapter is
used once before timing, so slot loading is not part of the timed run.

Example::

    >>> from sgl_ray.bench.lora import LoRABenchConfig, run_lora_bench
    >>> from sgl_ray.configs.engine_args import EngineArgs
    >>> run, results = run_lora_bench(EngineArgs(), LoRABenchConfig(adapter_counts=(2,), num_prompts=4, output_len=4))
    >>> results[0].workload, results[0].ours.output_tokens
    ('lora-2', 16)
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sgl_ray.bench.offline import Workload, _log, _token_pool, run_engine
from sgl_ray.bench.report import RunInfo, WorkloadResult
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.entrypoints.engine import Engine
from sgl_ray.lora.adapter import TARGET_MODULES

BASE = "sgl_ray-base"


@dataclass(frozen=True)
class LoRABenchConfig:
    adapter_counts: tuple[int, ...] = (1, 4, 16)
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 64
    rank: int = 16
    seed: int = 0
    repeats: int = 1  # base and adapter runs alternate this many times; the fastest of each counts

    def __post_init__(self) -> None:
        sizes = dataclasses.asdict(self)
        sizes.pop("adapter_counts")
        if bad := [k for k, v in sizes.items() if k != "seed" and v < 1] + (
            ["adapter_counts"] if not self.adapter_counts or min(self.adapter_counts) < 1 else []
        ):
            raise ValueError(f"{', '.join(bad)} must be >= 1")


def write_random_adapter(directory: Path, hf_config, rank: int, seed: int, b_std: float = 0.01) -> str:
    """A PEFT LoRA adapter directory with random A and B (``b_std``: B's standard deviation) for every target
    module of every layer."""
    from safetensors.torch import save_file

    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    kv = (getattr(hf_config, "num_key_value_heads", None) or heads) * head_dim
    inter = hf_config.intermediate_size
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for module, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * b_std
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGET_MODULES)}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return str(directory)


def run_lora_bench(engine_args: EngineArgs, cfg: LoRABenchConfig) -> tuple[RunInfo, list[WorkloadResult]]:
    """For each adapter count k: base-model run, then the same prompts spread round-robin over k adapters."""
    most = max(cfg.adapter_counts)
    engine_args = engine_args.replace(enable_lora=True, max_loras_per_batch=most, max_lora_rank=cfg.rank)
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="sgl-ray-lora-bench-") as tmp,
        Engine(**dataclasses.asdict(engine_args)) as engine,
    ):
        for i in range(most):
            path = write_random_adapter(Path(tmp) / f"lora{i}", engine.hf_config, cfg.rank, cfg.seed + i)
            engine.load_lora_adapter(f"lora{i}", path)
        rng = random.Random(f"{cfg.seed}-lora")
        pool = _token_pool(engine)
        prompts = [rng.choices(pool, k=cfg.input_len) for _ in range(cfg.num_prompts)]
        run = RunInfo(
            model=engine.model_path,
            dtype=str(engine.model_config.dtype).removeprefix("torch."),
            engine_args=dataclasses.asdict(engine_args),
        )
        for k in cfg.adapter_counts:
            params = {
                "num_prompts": cfg.num_prompts,
                "input_len": cfg.input_len,
                "output_len": cfg.output_len,
                "num_adapters": k,
                "rank": cfg.rank,
                "seed": cfg.seed,
            }
            wl = Workload(f"lora-{k}", prompts, cfg.output_len, params)
            names = [f"lora{i % k}" for i in range(cfg.num_prompts)]
            warm = [p[:8] for p in prompts[:k]]  # each adapter once: slot loads happen here, untimed
            engine.generate(input_ids=warm, sampling_params={"max_new_tokens": 2}, lora_path=names[:k])
            bases, ours = [], []
            for _ in range(cfg.repeats):
                bases.append(run_engine(engine, BASE, wl))
                _log(bases[-1], wl.name)
                ours.append(run_engine(engine, f"sgl_ray-{k}-lora", wl, lora_path=names))
                _log(ours[-1], wl.name)
            fastest = lambda runs: min(runs, key=lambda r: r.wall_s)  # noqa: E731
            results.append(
                WorkloadResult(wl.name, {**params, "repeats": cfg.repeats}, fastest(ours), fastest(bases))
            )
    return run, results
