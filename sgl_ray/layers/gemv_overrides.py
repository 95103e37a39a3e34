"""Launch shapes of the one-row GEMVs measured on the card at hand, read from the file that
``sgl-ray bench quant-kernels --tune --save FILE`` writes and ``SGL_RAY_GEMV_CONFIGS`` names.

The built-in tables (``triton_fp8.GEMV_TABLE``, ``triton_int4.GEMV_TABLE``, ``triton_gemv.QUANTIZED_CONFIGS``) hold
shapes measured on the reference card; a saved file lets a run on another card (or a benchmark in the same job as
its tuning) use its own measurements without editing them. The file maps a kernel kind (``fp8``, ``fp8-fused``,
``int4``, ``int4-fused``) to ``{"N,K": [launch shape fields...]}``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from sgl_ray.envs import get_env

KINDS = ("fp8", "fp8-fused", "int4", "int4-fused")


def parse(data: dict) -> dict[str, dict[tuple[int, int], tuple[int, ...]]]:
    """``{kind: {(N, K): shape}}`` from a saved file's JSON; raises ``ValueError`` on a malformed entry."""
    out: dict[str, dict[tuple[int, int], tuple[int, ...]]] = {}
    for kind, rows in data.items():
        if kind not in KINDS:
            raise ValueError(f"unknown GEMV kind {kind!r} (expected one of {', '.join(KINDS)})")
        table = out.setdefault(kind, {})
        for key, shape in rows.items():
            n, k = (int(v) for v in key.split(","))
            # block_n, block_k (or words), num_warps, num_stages [, lane_acc, prefetch for the fused kernel]
            if (
                not 4 <= len(shape) <= 6
                or not all(isinstance(v, int) and v >= 0 for v in shape)
                or 0 in shape[:4]
            ):
                raise ValueError(
                    f"{kind} ({n}, {k}): a launch shape is four to six integers, the first four positive, got {shape!r}"
                )
            table[(n, k)] = tuple(shape)
    return out


def dump(best: dict[str, dict[tuple[int, int], tuple[int, ...]]]) -> str:
    """The JSON text of ``{kind: {(N, K): shape}}``, as :func:`parse` reads it back."""
    return json.dumps({kind: {f"{n},{k}": list(s) for (n, k), s in rows.items()} for kind, rows in best.items()},
                      indent=1)  # fmt: skip


@functools.cache
def load() -> dict[str, dict[tuple[int, int], tuple[int, ...]]]:
    """The file ``SGL_RAY_GEMV_CONFIGS`` names, read once per process (``load.cache_clear()`` reads it again)."""
    path = get_env().gemv_configs
    return parse(json.loads(Path(path).read_text())) if path is not None else {}


def tuned(kind: str, n: int, k: int) -> tuple[int, ...] | None:
    """The saved launch shape of kernel ``kind`` for an ``[N, K]`` weight, or None."""
    return load().get(kind, {}).get((n, k))
