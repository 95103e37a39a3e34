"""The MoE expert kernels on the GPU: tune their launch configurations, and time them against the torch backend.

``--tune`` times candidate configurations per batch size (CUDA graphs of one call per weight set, median of
repeats; the small-batch GEMVs and, per ``block_m``, each grouped GEMM tuned in turn, then the combine mode) and
prints the rows of ``sgl_ray.layers.moe.triton_configs.TABLE`` (``--save`` writes them as JSON for ``--bench``
to use before they are pasted in). Candidates are compiled first in a pool of processes (Triton's disk cache is
shared), so a sweep costs the timing, not the compiles.

``--bench`` prints µs per call and GB/s (the bytes of the experts the routing touches plus the activations read
and written, over the time) for the Triton backend eagerly and captured in a CUDA graph (T <= 256), side by side
with the torch backend, and the share of the device-to-device copy rate measured in the same run. Every timed
call uses the next of ``--weight-sets`` distinct copies of the layer's weights (a model's layers back to back),
so the L2 cache (50 MB on an H100) cannot hold the experts between calls.

Example (on a CUDA device)::

    python -m sgl_ray.bench.moe_kernels --tune --shape qwen3-30b-a3b --save /tmp/moe.json
    python -m sgl_ray.bench.moe_kernels --bench --configs /tmp/moe.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from sgl_ray.layers.moe.base import Activation, ExpertWeights, TopK
from sgl_ray.layers.moe.torch_backend import TorchMoEBackend
from sgl_ray.layers.moe.triton_configs import (
    GemmConfig,
    GemvConfig,
    LaunchConfig,
    config_source,
    grouped,
    launch_config,
    small,
)

SHAPES = {"qwen3-30b-a3b": (128, 2048, 768, 8), "mixtral-8x7b": (8, 4096, 14336, 2)}  # E, H, I, k
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
GRAPH_MAX_TOKENS = 256
GEMV1 = [(4, 512, 2, 4), (4, 1024, 4, 4), (2, 512, 1, 4), (2, 1024, 2, 4), (8, 512, 4, 4), (1, 2048, 2, 4),
         (2, 2048, 4, 4), (4, 2048, 8, 4)]  # fmt: skip
# block_k 1024 takes a whole row of I = 768 in one tile: gemv2 then reads all its first pairs' weights before it
# waits for gemv1 (PDL)
GEMV2 = [(2, 256, 1, 4, 4), (2, 512, 2, 4, 2), (1, 1024, 2, 4, 8), (1, 1024, 4, 4, 8), (2, 1024, 4, 4, 8),
         (4, 1024, 4, 4, 4), (2, 1024, 4, 4, 4), (4, 256, 2, 4, 4)]  # fmt: skip
GEMM_NARROW = [(64, 64, 1, 4, 3), (64, 128, 1, 4, 3), (128, 64, 1, 4, 3), (32, 128, 1, 4, 4), (64, 128, 1, 4, 4),
               (128, 128, 1, 8, 3)]  # fmt: skip
GEMM_WIDE = [(64, 64, 8, 4, 3), (128, 64, 8, 8, 3), (128, 64, 8, 4, 4), (64, 128, 8, 4, 3), (128, 128, 8, 8, 3),
             (256, 64, 8, 8, 3), (128, 64, 8, 8, 4), (64, 64, 8, 4, 4)]  # fmt: skip
Shape = tuple[int, int, int, int]


class Layers:
    """``sets`` distinct weight copies of one layer shape, and a routing for ``tokens``."""

    def __init__(self, shape: Shape, dtype: torch.dtype, sets: int, fill: bool = True) -> None:
        num_experts, hidden, inter, self.top_k = shape
        make = (lambda *s: torch.randn(*s, device="cuda", dtype=dtype) * 0.02) if fill else _empty_cuda(dtype)
        self.weights = [
            ExpertWeights(make(num_experts, 2 * inter, hidden), make(num_experts, hidden, inter), None, None,
                          Activation("silu"))
            for _ in range(sets)
        ]  # fmt: skip
        self.shape, self.dtype = shape, dtype

    def inputs(self, tokens: int, seed: int = 0) -> tuple[torch.Tensor, TopK]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        num_experts, hidden = self.shape[:2]
        x = torch.randn(tokens, hidden, device="cuda", generator=g).to(self.dtype)
        scores = torch.rand(tokens, num_experts, device="cuda", generator=g)
        ids = scores.argsort(dim=1)[:, : self.top_k].to(torch.int32)  # distinct experts, uniform
        weights = torch.softmax(torch.randn(tokens, self.top_k, device="cuda", generator=g), dim=1)
        return x, TopK(weights, ids)

    def touched_bytes(self, x: torch.Tensor, topk: TopK) -> int:
        """The weights of every expert with a pair, plus x read and the output written."""
        num_experts, hidden, inter, _ = self.shape
        active = int(torch.unique(topk.ids).numel())
        size = torch.finfo(self.dtype).bits // 8
        return active * 3 * hidden * inter * size + 2 * x.numel() * size


def _empty_cuda(dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    return lambda *s: torch.empty(*s, device="cuda", dtype=dtype)


def time_calls(fn: Callable[[int], object], calls: int, graph: bool, reps: int = 10) -> float:
    """Median µs per call of ``fn(i)`` for i in range(calls), run back to back (captured in one graph)."""
    run: Callable[[], object]
    if graph:
        for i in range(calls):  # compile and warm up outside the capture
            fn(i)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(i)
        run = g.replay
    else:

        def run() -> None:
            for i in range(calls):
                fn(i)

    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def _time_config(layers: Layers, tokens: int, config: LaunchConfig) -> float:
    from sgl_ray.layers.moe.triton_backend import TritonMoEBackend

    backend = TritonMoEBackend(config)
    x, topk = layers.inputs(tokens)
    sets = len(layers.weights) if tokens <= GRAPH_MAX_TOKENS else 2
    try:
        us = time_calls(lambda i: backend.run_experts(x, layers.weights[i % sets], topk), sets, graph=True)
    except Exception as e:  # a tile over the shared-memory limit, mostly
        print(f"  skipped {config_source(config)}: {type(e).__name__}", flush=True)
        return float("inf")
    print(f"  T={tokens} {us:9.1f} us {config_source(config)}", flush=True)
    return us


def candidates(shape: Shape, tokens: int) -> tuple[list[LaunchConfig], list[int]]:
    """The small-batch configurations (when the batch is small) and the block_m values of the grouped path."""
    num_experts, _, _, top_k = shape
    smalls = [small(GemvConfig(*a), GemvConfig(*b)) for a, b in zip(GEMV1, GEMV2, strict=True)]
    rows = tokens * top_k / num_experts
    block_ms = (
        [16] if rows <= 4 else [16, 32] if rows <= 32 else [16, 32, 64] if rows <= 128 else [32, 64, 128]
    )
    return (smalls if tokens <= 16 and tokens * top_k <= 128 else []), block_ms


def _gemm_lists(block_m: int) -> list[GemmConfig]:
    return [GemmConfig(*c) for c in (GEMM_NARROW if block_m <= 16 else GEMM_WIDE)]


def _all_configs(shape: Shape, tokens: int) -> list[LaunchConfig]:
    """Every kernel variant :func:`tune` may time at this batch size (a kernel compiles per its own tile)."""
    smalls, block_ms = candidates(shape, tokens)
    out = list(smalls)
    for bm in block_ms:
        tiles = _gemm_lists(bm)
        out += [grouped(bm, tile, tiles[0]) for tile in tiles]  # every gemm1
        out += [
            grouped(bm, tiles[0], tile, atomic) for tile in tiles for atomic in (False, True)
        ]  # every gemm2
    return out


def _compile_job(job: tuple[Shape, str, list[LaunchConfig], list[int]]) -> int:
    """Compile (by running once) every configuration at each batch size; in a worker process."""
    shape, dtype_name, configs, tokens_list = job
    from sgl_ray.layers.moe.triton_backend import TritonMoEBackend

    layers = _worker_layers(shape, dtype_name)
    done = 0
    for config in configs:
        for tokens in tokens_list:
            x, topk = layers.inputs(tokens)
            try:
                TritonMoEBackend(config).run_experts(x, layers.weights[0], topk)
                done += 1
            except Exception:  # a tile over the shared-memory limit: reported when timed
                pass
    torch.cuda.synchronize()
    return done


@functools.cache
def _worker_layers(shape: Shape, dtype_name: str) -> Layers:
    return Layers(shape, getattr(torch, dtype_name), 1, fill=False)


def precompile(shape: Shape, dtype: torch.dtype, tokens: Iterable[int], workers: int) -> None:
    by_config: dict[LaunchConfig, list[int]] = {}
    for t in tokens:
        for config in _all_configs(shape, t):
            by_config.setdefault(config, []).append(t)
    jobs = [(shape, str(dtype).removeprefix("torch."), [c], ts) for c, ts in by_config.items()]
    from sgl_ray.bench import moe_kernels  # picklable by module name also when run as __main__

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = sum(pool.map(moe_kernels._compile_job, jobs))
    print(f"compiled {len(jobs)} configurations ({done} runs) in {workers} processes", flush=True)


def tune(
    shape: Shape, dtype: torch.dtype, tokens: Iterable[int], sets: int
) -> list[tuple[int, LaunchConfig]]:
    """The fastest configuration per batch size, by coordinate descent (see the module docstring)."""
    layers = Layers(shape, dtype, sets)
    rows = []
    for t in tokens:
        smalls, block_ms = candidates(shape, t)
        best: tuple[float, LaunchConfig] = (float("inf"), small())
        if smalls:
            g1 = min((_time_config(layers, t, c), c.gemv1) for c in smalls)[1]
            best = min((_time_config(layers, t, small(g1, c.gemv2)), small(g1, c.gemv2)) for c in smalls)
        small_us = best[0]
        for bm in block_ms:
            tiles = _gemm_lists(bm)
            g1 = min((_time_config(layers, t, grouped(bm, a, tiles[0])), a) for a in tiles)[1]
            g2 = min((_time_config(layers, t, grouped(bm, g1, b)), b) for b in tiles)[1]
            for atomic in (False, True):
                config = grouped(bm, g1, g2, atomic)
                best = min(best, (_time_config(layers, t, config), config))
        print(
            f"T={t}: best {best[0]:.1f} us (small-batch best {small_us:.1f}) {config_source(best[1])}",
            flush=True,
        )
        rows.append((t, best[1]))
    return rows


def table_source(shape: Shape, dtype: torch.dtype, rows: list[tuple[int, LaunchConfig]]) -> str:
    num_experts, hidden, inter, _ = shape
    body = "".join(f"        ({t}, {config_source(c)}),\n" for t, c in rows)
    return f'    ({num_experts}, {hidden}, {inter}, "{str(dtype).removeprefix("torch.")}"): (\n{body}    ),\n'


def _load_table(path: str | None) -> dict[str, list[tuple[int, LaunchConfig]]]:
    if path is None:
        return {}
    with open(path) as f:
        raw = json.load(f)
    return {
        key: [(t, LaunchConfig(c[0], GemvConfig(*c[1]), GemvConfig(*c[2]), c[3], GemmConfig(*c[4]),
                            GemmConfig(*c[5]), c[6])) for t, c in rows]
        for key, rows in raw.items()
    }  # fmt: skip


def _config_for(table: dict, shape: Shape, dtype: torch.dtype, tokens: int) -> LaunchConfig:
    rows = table.get(_key(shape, dtype))
    if rows:
        return next((c for t, c in rows if tokens <= t), rows[-1][1])
    num_experts, hidden, inter, top_k = shape
    return launch_config(num_experts, hidden, inter, dtype, tokens, top_k)


def _key(shape: Shape, dtype: torch.dtype) -> str:
    return ",".join(str(v) for v in shape[:3]) + "," + str(dtype).removeprefix("torch.")


def copy_rate() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (time_calls(lambda i: b.copy_(a), 1, graph=False, reps=20) * 1e-6)


def bench(shape: Shape, dtype: torch.dtype, tokens: Iterable[int], sets: int, table: dict) -> list[dict]:
    from sgl_ray.layers.moe.triton_backend import TritonMoEBackend

    layers, rate = Layers(shape, dtype, sets), copy_rate()
    torch_backend, results = TorchMoEBackend(), []
    for t in tokens:
        config = _config_for(table, shape, dtype, t)
        backend = TritonMoEBackend(config)
        x, topk = layers.inputs(t)
        calls = sets if t <= GRAPH_MAX_TOKENS else 2
        result = {"tokens": t, "path": "small" if config.small_batch else f"grouped{config.block_m}"}
        for name, impl, graph in [
            ("eager", backend, False),
            ("graph", backend, True),
            ("graph2", backend, True),  # the same again: the spread between two timings
            ("torch", torch_backend, False),
        ]:
            if graph and t > GRAPH_MAX_TOKENS:
                continue
            result[name] = time_calls(
                lambda i, impl=impl, x=x, topk=topk: impl.run_experts(x, layers.weights[i], topk),
                calls,
                graph,
            )
        best = result.get("graph", result["eager"])
        result["gb_s"] = layers.touched_bytes(x, topk) / (best * 1e-6) / 1e9
        result["of_copy"] = result["gb_s"] * 1e9 / rate
        result["copy_gb_s"] = rate / 1e9
        result["tflop_s"] = 6 * topk.ids.numel() * shape[1] * shape[2] / (best * 1e-6) / 1e12
        results.append(result)
        print(_row(shape, result), flush=True)
    return results


def _row(shape: Shape, r: dict) -> str:
    graph = f"{r['graph']:7.1f}/{r['graph2']:<7.1f}" if "graph" in r else "        -      "
    return (
        f"E={shape[0]:<3} H={shape[1]} I={shape[2]:<5} k={shape[3]} T={r['tokens']:<5} {r['path']:<10} "
        f"eager {r['eager']:9.1f} us  graph {graph} us  torch {r['torch']:9.1f} us  "
        f"{r['gb_s']:7.0f} GB/s ({r['of_copy']:.0%} of copy {r['copy_gb_s']:.0f})  {r['tflop_s']:6.1f} TFLOP/s"
    )


def add_args(parser: argparse.ArgumentParser) -> None:
    """The options of ``sgl-ray bench moe-kernels`` (and ``python -m sgl_ray.bench.moe_kernels``)."""
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--tune", action="store_true", help="measure candidate launch configs, print table rows"
    )
    mode.add_argument(
        "--bench", action="store_true", help="time the table's configs against the torch experts"
    )
    parser.add_argument("--shape", action="append", choices=list(SHAPES), help="default: all")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--weight-sets", type=int, default=8)
    parser.add_argument("--workers", type=int, default=12, help="processes that compile the candidates")
    parser.add_argument("--save", help="--tune: write the rows as JSON here")
    parser.add_argument("--configs", help="--bench: a JSON table from --tune --save (else the repository's)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(parser)
    return run(parser.parse_args(argv))


def run(ns: argparse.Namespace) -> int:
    dtype, tokens = getattr(torch, ns.dtype), [int(t) for t in ns.tokens.split(",")]
    shapes = [SHAPES[s] for s in ns.shape or SHAPES]
    print(
        f"{torch.cuda.get_device_name()}; {ns.weight_sets} weight sets per shape (L2 cannot hold the experts)"
    )
    if ns.tune:
        tables = {}
        for shape in shapes:
            if ns.workers > 0:
                precompile(shape, dtype, tokens, ns.workers)
            tables[_key(shape, dtype)] = (shape, tune(shape, dtype, tokens, ns.weight_sets))
            if ns.save:  # after every shape, so that a cut-off sweep keeps what it measured
                with open(ns.save, "w") as f:
                    json.dump({k: [(t, list(c)) for t, c in rows] for k, (_, rows) in tables.items()}, f)
        print("".join(table_source(shape, dtype, rows) for shape, rows in tables.values()))
        return 0
    table = _load_table(ns.configs)
    results = {f"{s}": bench(SHAPES[s], dtype, tokens, ns.weight_sets, table) for s in ns.shape or SHAPES}
    for name, rows in results.items():
        print(name)
        for r in rows:
            print(_row(SHAPES[name], r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
