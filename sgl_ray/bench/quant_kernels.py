"""The one-row (batch-1 decode) GEMVs of quantized weights on the GPU, against the bf16 GEMV and the copy rate.

For each projection of a model shape (Llama-3.1-8B by default: QKV, O, gate/up, down) this times, per call:

- ``bf16``: the bf16 GEMV (:mod:`sgl_ray.layers.triton_gemv`) on the float weights: the speed to beat per byte;
- ``fp8``: the FP8 weight-only GEMV of :mod:`sgl_ray.layers.quantization.triton_fp8` (per-row scales), each
  candidate launch shape;
- ``fp8-fused``: the bf16 GEMV's kernel reading the FP8 weight with its per-row scales (what the fused decode
  paths run: rotary and KV store, SiLU-and-mul), each candidate;
- ``int4``: the INT4 GEMV of :mod:`sgl_ray.layers.quantization.triton_int4` (group 128), each candidate;
- ``int4-fused``: the bf16 GEMV's kernel reading the INT4 words (the fused decode paths), each candidate.

Every call reads the next of several copies of the weights (more bytes than the L2 cache holds), calls are
captured in a CUDA graph, and the figure is the median of repeats. ``GB/s`` counts the bytes held (weights,
scales, zero points); ``of copy`` is that over the device-to-device copy rate measured in the same run. Each
kernel's output is checked against the dequantized weights before it is timed. ``--tune`` prints the fastest
launch shape per projection as rows for the kernels' ``GEMV_TABLE``; ``--save FILE`` writes them as a file that
``SGL_RAY_GEMV_CONFIGS=FILE`` makes later runs on this card use (:mod:`sgl_ray.layers.gemv_overrides`).

Example (on a CUDA device)::

    python -m sgl_ray.bench.quant_kernels --tune
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

SHAPES = {
    "llama-3.1-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "qwen3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)},
}
FP8_CANDIDATES = [(2, 1024, 1, 4), (4, 1024, 2, 4), (8, 1024, 4, 3), (2, 2048, 2, 4), (4, 512, 1, 4),
                  (8, 2048, 8, 3), (1, 2048, 1, 4), (16, 512, 4, 3), (4, 2048, 4, 3)]  # fmt: skip
FUSED_CANDIDATES = [(2, 512, 1, 4), (8, 1024, 4, 3), (4, 512, 2, 4), (2, 1024, 2, 4), (4, 1024, 4, 3), (2, 256, 1, 4),
                    (4, 256, 1, 4)]  # fmt: skip
INT4_CANDIDATES = [(2, 64, 1, 4), (4, 64, 1, 4), (4, 128, 2, 4), (8, 64, 2, 4), (8, 128, 4, 3), (2, 128, 1, 4),
                   (16, 64, 4, 3), (4, 32, 1, 4), (8, 32, 1, 4), (1, 128, 1, 4)]  # fmt: skip
L2_BUSTING_BYTES = 256 << 20  # weight bytes cycled through per timed pass


def _time(calls: list[Callable[[], object]], repeats: int) -> float:
    """µs per call: ``calls`` captured in one CUDA graph, replayed ``repeats`` times, the median."""
    from sgl_ray.attention.triton_bench import graph_time_ms

    def all_calls() -> None:
        for c in calls:
            c()

    return graph_time_ms(all_calls, repeats) * 1000 / len(calls)


def copy_rate() -> float:
    """Device-to-device copy rate, bytes read + written per second."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = _time([lambda: b.copy_(a)] * 4, 5)
    return 2 * a.numel() / (us * 1e-6)


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, what: str) -> None:
    want = x.float() @ w.float().t()
    scale = (x.float().abs() @ w.float().abs().t()).max().item()
    err = (got.float() - want).abs().max().item()
    if err > 2e-2 * scale:
        raise AssertionError(f"{what}: max error {err:.3g} of {scale:.3g}")


def _copies(nbytes: int) -> int:
    return max(2, -(-L2_BUSTING_BYTES // nbytes))


def bench_shape(n: int, k: int, repeats: int, kinds: set[str]) -> list[dict]:
    from sgl_ray.layers import triton_gemv
    from sgl_ray.layers.quantization import triton_fp8, triton_int4
    from sgl_ray.layers.quantization.fp8 import quantize_fp8_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
    rows: list[dict] = []

    def run(kind: str, cfg: tuple, fn: Callable, operands: list, nbytes: int, ref: torch.Tensor) -> None:
        try:
            _check(fn(*operands[0]), x, ref, f"{kind} {cfg}")
            us = _time([lambda o=o: fn(*o) for o in operands] * 2, repeats)
        except Exception as exc:  # a launch shape the compiler refuses: say so, keep going
            print(f"  {kind} {cfg}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            return
        rows.append({"kind": kind, "config": cfg, "us": us, "gbps": nbytes / us / 1e3})

    if "bf16" in kinds:
        sets = [(w.clone(),) for _ in range(_copies(w.nbytes))]
        run("bf16", (), lambda wt: triton_gemv.gemv(x, wt), sets, w.nbytes, w)
        del sets
    if kinds & {"fp8", "fp8-fused"}:
        q, s = quantize_fp8_rows(w)
        ref = q.float() * s
        nbytes = q.nbytes + s.nbytes
        sets = [(q.clone(), s.clone()) for _ in range(_copies(nbytes))]
        if "fp8" in kinds:
            for c in FP8_CANDIDATES:
                cfg = triton_fp8.Fp8GemvConfig(*c)
                fn = lambda wt, sc, cfg=cfg: triton_fp8.fp8_linear(x, wt, sc, None, w8a8=False, config=cfg)  # noqa: E731
                run("fp8", c, fn, sets, nbytes, ref)
        if "fp8-fused" in kinds:
            for c in FUSED_CANDIDATES:
                cfg = triton_gemv.GemvConfig(*c)
                fn = lambda wt, sc, cfg=cfg: triton_gemv.gemv(x, wt, config=cfg, weight_scale=sc.view(-1))  # noqa: E731
                run("fp8-fused", c, fn, sets, nbytes, ref)
        del sets, q, s, ref
    if kinds & {"int4", "int4-fused"}:
        group = 128
        qweight, scales, zeros = _int4_weights(w, group)
        qv = torch.stack([(qweight >> (4 * i)) & 0xF for i in range(8)], dim=-1).view(n, k).float()
        ref = (
            (qv.view(n, k // group, group) - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
        ).view(n, k)
        nbytes = qweight.nbytes + scales.nbytes + zeros.nbytes
        sets = [(qweight.clone(), scales.clone(), zeros.clone()) for _ in range(_copies(nbytes))]
        if "int4-fused" in kinds:
            for c in FUSED_CANDIDATES:
                cfg = triton_gemv.GemvConfig(*c)
                fn = lambda qw, sc, z, cfg=cfg: triton_gemv.gemv(  # noqa: E731
                    x, qw, config=cfg, weight_scale=sc, weight_zeros=z, group_size=group
                )
                run("int4-fused", c, fn, sets, nbytes, ref)
        for c in INT4_CANDIDATES if "int4" in kinds else []:
            cfg = triton_int4.Int4GemvConfig(*c)
            fn = lambda qw, sc, z, cfg=cfg: triton_int4.int4_linear(x, qw, sc, z, group, None, cfg)  # noqa: E731
            run("int4", c, fn, sets, nbytes, ref)
    return rows


def bench_gemm(n: int, k: int, m: int, repeats: int) -> list[tuple[str, float]]:
    """µs per call of an ``[m, k] x [k, n]`` product: bf16 (cuBLAS), and FP8 W8A8 per-row (activation
    quantization included) through ``torch._scaled_mm`` and through the Triton GEMM."""
    import torch.nn.functional as F

    from sgl_ray.layers.quantization import triton_fp8
    from sgl_ray.layers.quantization.fp8 import quantize_fp8_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    q, s = quantize_fp8_rows(w)
    out = [("bf16", _time([lambda: F.linear(x, w)] * 4, repeats))]
    for name, flag in (("fp8-scaled-mm", True), ("fp8-triton", False)):
        triton_fp8.USE_SCALED_MM = flag
        try:
            xq, xs = triton_fp8.quantize_activations(x, None)
            _check(triton_fp8.fp8_linear(x, q, s, None), xq.float() * xs, q.float() * s, name)
            out.append((name, _time([lambda: triton_fp8.fp8_linear(x, q, s, None)] * 4, repeats)))
        except Exception as exc:
            print(f"  {name} m={m}: failed ({type(exc).__name__}: {str(exc)[:160]})")
    triton_fp8.USE_SCALED_MM = True
    from sgl_ray.layers.quantization import triton_int4

    qw, sc, z = _int4_weights(w)
    for name, rows_min in (("int4-dequant", 1), ("int4-triton", 1 << 30)):
        saved, triton_int4.DEQUANT_MIN_ROWS = triton_int4.DEQUANT_MIN_ROWS, rows_min
        try:
            out.append((name, _time([lambda: triton_int4.int4_linear(x, qw, sc, z, 128)] * 4, repeats)))
        except Exception as exc:
            print(f"  {name} m={m}: failed ({type(exc).__name__}: {str(exc)[:160]})")
        finally:
            triton_int4.DEQUANT_MIN_ROWS = saved
    return out


def _int4_weights(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qweight, scales, zeros)`` of ``w`` rounded to 4 bits, asymmetric, per ``group`` columns."""
    from sgl_ray.layers.quantization.int4 import pack_int4

    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = (-lo / scale).round().clamp(0, 15)
    qv = (wg / scale + zero).round().clamp(0, 15)
    return (
        pack_int4(qv.view(n, k).to(torch.uint8)),
        scale.squeeze(-1).half(),
        zero.squeeze(-1).to(torch.uint8),
    )


def add_args(p: argparse.ArgumentParser) -> None:
    """The options of ``sgl-ray bench quant-kernels`` (and ``python -m sgl_ray.bench.quant_kernels``)."""
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument(
        "--kinds", default="bf16,fp8,fp8-fused,int4,int4-fused", help="comma-separated kernels to time"
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tune", action="store_true", help="print the fastest launch shape per projection")
    p.add_argument("--save", default="", help="with --tune: write the fastest shapes to this JSON file")
    p.add_argument(
        "--gemm-rows", default="", help="comma-separated token counts for the GEMM rows (e.g. 256,4096)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p)
    return run(p.parse_args(argv))


def run(ns: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("quant_kernels: needs a CUDA device")
        return 2
    kinds = set(ns.kinds.split(","))
    rate = copy_rate()
    print(f"device {torch.cuda.get_device_name()}, copy rate {rate / 1e9:.0f} GB/s")
    best: dict[str, dict[str, dict]] = {}
    for name, (n, k) in SHAPES[ns.shape].items():
        rows = bench_shape(n, k, ns.repeats, kinds)
        print(f"{name} [{n}, {k}]")
        for r in sorted(rows, key=lambda r: (r["kind"], r["us"])):
            print(
                f"  {r['kind']:<10} {str(r['config']):<18} {r['us']:8.1f} us {r['gbps']:7.0f} GB/s "
                f"{r['gbps'] * 1e9 / rate:5.2f} of copy"
            )
            if r["kind"] not in best.get(name, {}) or r["us"] < best[name][r["kind"]]["us"]:
                best.setdefault(name, {})[r["kind"]] = r
    for m in [int(t) for t in ns.gemm_rows.split(",") if t]:
        for name, (n, k) in SHAPES[ns.shape].items():
            rows = bench_gemm(n, k, m, ns.repeats)
            flops = 2 * m * n * k
            print(
                f"gemm {name} m={m}: "
                + ", ".join(f"{kind} {us:.1f} us ({flops / us / 1e6:.0f} TFLOP/s)" for kind, us in rows)
            )
    total: dict[str, float] = {}
    for name in best:
        for kind, r in best[name].items():
            total[kind] = total.get(kind, 0.0) + r["us"]
    print("per layer (best of each):", ", ".join(f"{kind} {us:.1f} us" for kind, us in sorted(total.items())))
    if ns.tune:
        for kind in ("fp8", "fp8-fused", "int4", "int4-fused"):
            print(f"# {kind}")
            for name, (n, k) in SHAPES[ns.shape].items():
                if kind in best.get(name, {}):
                    print(
                        f"    ({n}, {k}): {best[name][kind]['config']},  # {name} {best[name][kind]['us']:.1f} us"
                    )
        if ns.save:
            from sgl_ray.layers import gemv_overrides

            saved = {
                kind: {
                    SHAPES[ns.shape][name]: tuple(rows[kind]["config"])
                    for name, rows in best.items()
                    if kind in rows
                }
                for kind in gemv_overrides.KINDS
            }
            Path(ns.save).write_text(
                gemv_overrides.dump({kind: rows for kind, rows in saved.items() if rows})
            )
            print(f"saved to {ns.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
