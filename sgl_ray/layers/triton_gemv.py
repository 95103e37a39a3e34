"""Triton matrix-vector products for decode steps: ``y = x W^T (+ b)`` with ``x`` [M, K], M small (1 in use).

At batch 1 a decode step is a chain of GEMVs that only stream their weights: the whole step is bounded by how
fast the weights come in from memory. One program owns ``BLOCK_N`` output columns (rows of ``W``, each read
contiguously) and walks K in ``BLOCK_K`` chunks, keeping ``num_stages`` chunks in flight; the products of all
M rows accumulate in fp32 registers, lane by lane, and are summed across the chunk once at the end, so the loop
body is loads and fused multiply-adds only.

The op before a projection can run inside it, as the input is read (``PROLOGUE``): RMSNorm with the residual
add (:func:`rmsnorm_gemv`: every program first sums the squares of the whole row, which stays in L2/L1, and
program 0 writes the new residual), or SiLU-and-mul (:func:`silu_mul_gemv`). At batch 1 each small kernel
between two GEMVs costs a few microseconds of latency that the weight stream cannot hide; fused, the next
projection starts streaming its weights while the previous one finishes.

The op after a projection can run as it stores its outputs (epilogues): rotary and the KV-pool store after QKV
(:func:`qkv_rotary_store_gemv`), or the residual add with each program's sum of squares of its outputs
(:func:`residual_gemv`), from which the next projection applies RMSNorm as a scale of its product
(:func:`normed_gemv`, for weights with the norm's scale folded in).

Imported only on CUDA (through :func:`sgl_ray.layers.cuda_ops.cuda_ops`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sgl_ray.layers import gemv_overrides
from sgl_ray.layers.triton_gemv_epilogues import (
    NormOfInput,
    RotaryStore,
    head_norm_rotary_store_epilogue,
    rotary_store_epilogue,
)
from sgl_ray.layers.triton_gemv_inputs import accumulate, gemv_input, int4_rows, residual_sum
from sgl_ray.layers.triton_pdl import launch_args, pdl_enter, use_pdl

MAX_ROWS = 1  # from 2 rows on cuBLAS was faster on an H200 (8B shapes), and from 4 by far


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    lane_acc: bool = True  # sum across the chunk once at the end (else after every chunk: fewer registers)
    prefetch: int = 1  # K chunks of weights read before waiting for the previous kernel (PDL); a power of two


# Of 20 configurations timed on an H200 over the 8B shapes at batch 1 with PDL (QKV, O, gate/up, down, LM head),
# these two took 14.8, 10.0, 56.9, 30.0, 235.5 µs against cuBLAS's 16.4, 13.3, 60.2, 32.2, 263.0 µs
# (see gemv_config).
DEFAULT_CONFIG = GemvConfig(block_n=2, block_k=512, num_warps=1, num_stages=4)
NARROW_CONFIG = GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=3)


@triton.jit
def _gemv_kernel(
    X, W, Bias, Y, R, NormW, ROut, M, N, K, stride_xm, stride_wn, stride_ym, stride_rm, stride_rom, eps,
    Cos, Sin, Loc, KCache, VCache, stride_ct, stride_cache, num_heads, num_kv_heads,
    Res, stride_res, SqOut, SqIn, num_parts, QNorm, KNorm, Counters, head_eps, WScale, WZero, num_groups,
    group_size, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, LANE_ACC: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH_K: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROTARY_STORE: tl.constexpr, HALF: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr, SCALE_BY_SQ: tl.constexpr, SQ_BLOCK: tl.constexpr, HEAD_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_WSCALE: tl.constexpr, W_INT4: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if ROTARY_STORE:
        # rows of W in rotary pairs: the program owns pairs i0 .. i0 + PAIRS - 1 of one head, as (i, i + HALF)
        # interleaved, so that it can rotate its own outputs
        PAIRS: tl.constexpr = BLOCK_N // 2
        head = pid // (HALF // PAIRS)
        i0 = (pid % (HALF // PAIRS)) * PAIRS
        j = tl.arange(0, BLOCK_N)
        offs_n = head * (2 * HALF) + i0 + j // 2 + (j % 2) * HALF
    else:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, M_PAD)
    mask_n = offs_n < N
    mask_m = offs_m < M
    x_rows = (offs_m * stride_xm)[:, None]
    r_rows = (offs_m * stride_rm)[:, None]
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    if USE_PDL and not W_INT4:
        # Launched while the previous kernel may still run (see triton_pdl): the first PREFETCH_K columns of
        # the weights are read before waiting for it, since no kernel writes weights; x, and the outputs, after.
        offs_p = tl.arange(0, PREFETCH_K)
        w_pre = tl.load(w_rows + offs_p[None, :], mask=mask_n[:, None] & (offs_p < K)[None, :], other=0.0)
    pdl_enter(USE_PDL)
    rstd = tl.zeros([M_PAD], dtype=tl.float32)
    if PROLOGUE == 1:  # RMSNorm: one pass over the whole row for its scale (L2-resident, every program)
        sq = tl.zeros([M_PAD], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            mask = mask_m[:, None] & (cols < K)[None, :]
            h = residual_sum(X, R, x_rows, r_rows, cols, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                if pid == 0:  # the new residual stream, written once
                    tl.store(ROut + (offs_m * stride_rom)[:, None] + cols[None, :], h, mask=mask)
            hf = h.to(tl.float32)
            sq += tl.sum(hf * hf, axis=1)
        rstd = 1.0 / tl.sqrt(sq / K + eps)
    k_start = 0
    pre = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    if USE_PDL and not W_INT4:
        x_pre = gemv_input(
            X, R, NormW, x_rows, r_rows, offs_p, mask_m[:, None] & (offs_p < K)[None, :], rstd, K,
            PROLOGUE, HAS_RESIDUAL,
        )  # fmt: skip
        pre = tl.sum(w_pre.to(tl.float32)[None, :, :] * x_pre.to(tl.float32)[:, None, :], axis=2)
        k_start = PREFETCH_K
    if LANE_ACC:
        acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    if W_INT4:  # BLOCK_K counts words here; the products come out whole
        k_start = K
        pre = int4_rows(
            X, R, NormW, x_rows, r_rows, W, WScale, WZero, offs_n, mask_n, mask_m, rstd, K, num_groups, group_size,
            M_PAD, BLOCK_N, BLOCK_K, PROLOGUE, HAS_RESIDUAL,
        )  # fmt: skip
    for k0 in range(k_start, K, BLOCK_K):
        cols = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_rows + cols[None, :], mask=mask_n[:, None], other=0.0)
            x = gemv_input(
                X, R, NormW, x_rows, r_rows, cols, mask_m[:, None], rstd, K, PROLOGUE, HAS_RESIDUAL
            )
        else:
            in_k = cols < K
            w = tl.load(w_rows + cols[None, :], mask=mask_n[:, None] & in_k[None, :], other=0.0)
            x = gemv_input(
                X, R, NormW, x_rows, r_rows, cols, mask_m[:, None] & in_k[None, :], rstd, K, PROLOGUE, HAS_RESIDUAL
            )  # fmt: skip
        acc = accumulate(acc, w, x, LANE_ACC)
    if LANE_ACC:
        y = tl.sum(acc, axis=2) + pre  # [M_PAD, BLOCK_N]
    else:
        y = acc + pre
    if HAS_WSCALE and not W_INT4:  # an FP8 weight's per-row scales
        y = y * tl.load(WScale + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SCALE_BY_SQ:  # RMSNorm's scale of the input row, from the parts' sums of squares its producer wrote
        sq = tl.zeros([M_PAD], dtype=tl.float32)
        for p0 in range(0, num_parts, SQ_BLOCK):
            parts = p0 + tl.arange(0, SQ_BLOCK)
            sq_ptrs = SqIn + (offs_m * num_parts)[:, None] + parts[None, :]
            sq += tl.sum(
                tl.load(sq_ptrs, mask=mask_m[:, None] & (parts < num_parts)[None, :], other=0.0), axis=1
            )
        y = y * (1.0 / tl.sqrt(sq / K + eps))[:, None]
    if HAS_BIAS:
        y += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ADD_RESIDUAL:  # h = residual + y, rounded like the RMSNorm kernel's add; and this part's sum of h^2
        out_mask = mask_m[:, None] & mask_n[None, :]
        r = tl.load(Res + (offs_m * stride_res)[:, None] + offs_n[None, :], mask=out_mask, other=0.0)
        h = (y.to(Y.dtype.element_ty).to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], h, mask=out_mask)
        hf = h.to(tl.float32)
        tl.store(SqOut + offs_m * tl.num_programs(0) + pid, tl.sum(hf * hf, axis=1), mask=mask_m)
    elif ROTARY_STORE and HEAD_NORM:
        head_norm_rotary_store_epilogue(
            Y, y, Cos, Sin, Loc, KCache, VCache, QNorm, KNorm, Counters, head_eps, offs_m, mask_m, head, i0,
            stride_ym, stride_ct, stride_cache, num_heads, num_kv_heads, M_PAD, PAIRS, HALF, BLOCK_D,
        )  # fmt: skip
    elif ROTARY_STORE:
        rotary_store_epilogue(
            Y, y, Cos, Sin, Loc, KCache, VCache, offs_m, mask_m, head, i0, stride_ym, stride_ct, stride_cache,
            num_heads, num_kv_heads, M_PAD, PAIRS, HALF,
        )  # fmt: skip
    else:
        y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`gemv` takes this product: up to ``MAX_ROWS`` rows of a half-precision input against a
    weight of the same dtype with unit stride along K, or a quantized one: FP8 e4m3 with per-row scales
    (``weight_scale``) or INT4 words (int32 ``[N, K / 8]`` with ``weight_scale``, ``weight_zeros``, ``group_size``:
    the layout of ``layers.quantization.int4``)."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype in (x.dtype, torch.float8_e4m3fn, torch.int32)
        and x.stride(1) == 1
        and weight.stride(1) == 1
    )


def rotary_store_supports(x: torch.Tensor, weight: torch.Tensor, head_dim: int) -> bool:
    """Whether :func:`qkv_rotary_store_gemv` takes this QKV product in its default launch shape."""
    kind = weight_kind(weight)
    pairs = gemv_config(weight.shape[0], weight.shape[1] * (8 if kind == "int4" else 1), kind).block_n // 2
    return supports(x, weight) and head_dim % 2 == 0 and pairs > 0 and (head_dim // 2) % pairs == 0


# Launch shapes of quantized weights read as held, by (kind, N, K) with kind "fp8" or "int4" (K: input columns),
# from `sgl-ray bench quant-kernels --tune` (its fp8-fused / int4-fused rows); other shapes take the float ones.
QUANTIZED_CONFIGS: dict[tuple[str, int, int], GemvConfig] = {}


def weight_kind(weight: torch.Tensor) -> str:
    """ "int4" (packed words), "fp8" or "float": how the kernel reads ``weight``."""
    return (
        "int4" if weight.dtype == torch.int32 else "fp8" if weight.dtype == torch.float8_e4m3fn else "float"
    )


def gemv_config(n: int, k: int, kind: str = "float") -> GemvConfig:
    """The launch shape for an ``[N, K]`` weight read as ``kind`` (:func:`weight_kind`): a measured entry of a
    saved file (:mod:`sgl_ray.layers.gemv_overrides`) or of ``QUANTIZED_CONFIGS``, else the float shapes,
    measured on an H200 over the 8B shapes at batch 1 (PDL on): narrow outputs (O, down: N 4096) do best with 8 rows of W per program and long K chunks, the rest with 2 rows
    per single-warp program. Quantized weights keep the float shapes' bytes per step."""
    if kind == "float":
        return NARROW_CONFIG if n <= 4096 else DEFAULT_CONFIG
    saved = gemv_overrides.tuned(f"{kind}-fused", n, k)
    config = GemvConfig(*saved) if saved else QUANTIZED_CONFIGS.get((kind, n, k))
    return config or (NARROW_CONFIG if n <= 4096 else DEFAULT_CONFIG)


_PLAIN, _RMSNORM, _SILU_MUL = 0, 1, 2


def _launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, config: GemvConfig | None,
    pdl: bool | None, prologue: int = _PLAIN, residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, rotary: RotaryStore | None = None,
    add_to: torch.Tensor | None = None, sumsq: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None, weight_zeros: torch.Tensor | None = None, group_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    m = x.shape[0]
    n = weight.shape[0]
    int4 = weight.dtype == torch.int32
    if weight.shape[1] * (8 if int4 else 1) != k:
        raise ValueError(f"weight has {weight.shape[1] * (8 if int4 else 1)} input columns, the input {k}")
    if (weight.dtype in (torch.float8_e4m3fn, torch.int32)) != (weight_scale is not None):
        raise ValueError(
            "a quantized weight needs its scales (weight_scale), and only a quantized weight takes them"
        )
    if int4:
        groups = weight_scale.shape[1]
        if (
            weight_zeros is None
            or group_size % 8
            or groups * group_size < k
            or weight_scale.shape != (n, groups)
            or weight_zeros.shape != (n, groups)
            or not (weight_scale.is_contiguous() and weight_zeros.is_contiguous())
        ):
            raise ValueError(
                "INT4 words need contiguous [N, G] scales and zero points and a group size that is a multiple of "
                f"8, got {tuple(weight_scale.shape)}, {None if weight_zeros is None else tuple(weight_zeros.shape)}, "
                f"{group_size}"
            )
    elif weight_scale is not None and (weight_scale.numel() != n or weight_scale.stride(0) != 1):
        raise ValueError(
            f"weight_scale needs {n} per-row scales of unit stride, got {tuple(weight_scale.shape)}"
        )
    config = config or gemv_config(n, k, weight_kind(weight))
    half = 1
    if rotary is not None:
        half = rotary.k_cache.shape[-1] // 2
        if config.block_n % 2 or half % (config.block_n // 2):
            raise ValueError(
                f"{config.block_n} rows per program do not split into rotary pairs of head {2 * half}"
            )
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    r_out = torch.empty((m, k), dtype=x.dtype, device=x.device) if residual is not None else None
    pdl = use_pdl(x) if pdl is None else pdl
    if int4:  # words per step: the same bytes as the 16-bit weights' columns
        block_k = min(config.block_k // 4, triton.next_power_of_2(k // 8))
    else:  # one-byte weights: twice the columns per step, the same bytes
        block_k = min(config.block_k * (2 if weight.element_size() == 1 else 1), triton.next_power_of_2(k))
    prefetch_k = min(block_k * config.prefetch, triton.next_power_of_2(k))
    r = residual if residual is not None else x
    ro = r_out if r_out is not None else x
    rs = rotary or RotaryStore(x, x, x, x, x, 0, 0)
    head_norm = rs.q_norm is not None
    grid = triton.cdiv(n, config.block_n)
    sq_out = torch.empty((m, grid), dtype=torch.float32, device=x.device) if add_to is not None else None
    sq_in = sumsq if sumsq is not None else x
    num_parts = sq_in.shape[1] if sumsq is not None else 1
    _gemv_kernel[(grid,)](
        x, weight, bias if bias is not None else weight, out, r, norm_weight if norm_weight is not None else weight,
        ro, m, n, k, x.stride(0), weight.stride(0), out.stride(0), r.stride(0), ro.stride(0), eps,
        rs.cos, rs.sin, rs.loc, rs.k_cache, rs.v_cache, rs.cos.stride(0), rs.k_cache.stride(0), rs.num_heads,
        rs.num_kv_heads, add_to if add_to is not None else x, (add_to if add_to is not None else x).stride(0),
        sq_out if sq_out is not None else x, sq_in, num_parts, rs.q_norm if head_norm else x,
        rs.k_norm if head_norm else x, rs.counters if head_norm else x, rs.norm_eps,
        weight_scale if weight_scale is not None else x, weight_zeros if weight_zeros is not None else x,
        weight_scale.shape[1] if int4 else 1, group_size or 1,
        M_PAD=triton.next_power_of_2(m), BLOCK_N=config.block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0, LANE_ACC=config.lane_acc, USE_PDL=pdl, PREFETCH_K=prefetch_k,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, ROTARY_STORE=rotary is not None, HALF=half,
        ADD_RESIDUAL=add_to is not None, SCALE_BY_SQ=sumsq is not None,
        SQ_BLOCK=min(1024, triton.next_power_of_2(num_parts)), HEAD_NORM=head_norm,
        BLOCK_D=triton.next_power_of_2(half), HAS_WSCALE=weight_scale is not None, W_INT4=int4,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_args(pdl),
    )  # fmt: skip
    return out, (r_out if add_to is None else sq_out)


def gemv(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], unit stride along K
    bias: torch.Tensor | None = None,  # [N]
    config: GemvConfig | None = None,  # None: gemv_config(N, K)
    pdl: bool | None = None,  # None: wherever the device supports it
    weight_scale: torch.Tensor | None = None,  # FP8 e4m3 weight: [N] float32 per-row scales; INT4: [N, G]
    weight_zeros: torch.Tensor | None = None,  # INT4: uint8 [N, G] zero points
    group_size: int = 0,  # INT4: values per group
) -> torch.Tensor:  # [M, N]
    return _launch(
        x, weight, bias, x.shape[1], config, pdl, weight_scale=weight_scale, weight_zeros=weight_zeros,
        group_size=group_size,
    )[0]  # fmt: skip


def rmsnorm_gemv(
    x: torch.Tensor,  # [M, K]
    residual: torch.Tensor | None,  # [M, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(h) W^T (+ b), h)`` with ``h = x + residual`` (or ``x``): RMSNorm with the residual add and the
    product in one kernel, the same rounding as ``triton_ops.rmsnorm`` followed by :func:`gemv`."""
    if norm_weight.shape != (x.shape[1],):
        raise ValueError(f"norm weight of shape {tuple(norm_weight.shape)} for rows of {x.shape[1]}")
    out, r_out = _launch(x, weight, bias, x.shape[1], config, pdl, _RMSNORM, residual, norm_weight, eps)
    return out, (r_out if r_out is not None else x)


def silu_mul_gemv(
    x: torch.Tensor,  # [M, 2K] = [gate | up]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool | None = None,
    weight_scale: torch.Tensor | None = None,
    weight_zeros: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:
    """``(silu(gate) * up) W^T (+ b)`` in one kernel, rounded like ``triton_ops.silu_and_mul`` then :func:`gemv`
    (quantized weights as :func:`gemv` takes them)."""
    if x.shape[1] % 2:
        raise ValueError(f"[gate | up] rows of odd width {x.shape[1]}")
    return _launch(
        x, weight, bias, x.shape[1] // 2, config, pdl, _SILU_MUL, weight_scale=weight_scale,
        weight_zeros=weight_zeros, group_size=group_size,
    )[0]  # fmt: skip


def qkv_rotary_store_gemv(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [(H + 2 KVH) D, K]: the q, k and v heads' rows
    bias: torch.Tensor | None,
    rotary: RotaryStore,
    config: GemvConfig | None = None,  # BLOCK_N even, and D / 2 divisible by BLOCK_N / 2
    pdl: bool | None = None,
    norm: NormOfInput | None = None,  # see normed_gemv
    weight_scale: torch.Tensor | None = None,  # a quantized weight's, as gemv takes them
    weight_zeros: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor:  # [M, (H + 2 KVH) D]: q and k rotated, v as is
    """The QKV projection with rotary and the KV-pool store as its epilogue: what :func:`gemv` then
    ``triton_ops.rotary_store`` compute, bit for bit, in one kernel. Each program owns whole rotary pairs
    (rows ``i`` and ``i + D / 2`` of a head) instead of adjacent rows, so it rotates its own outputs; k and v
    also go to ``rotary.k_cache``/``v_cache`` rows ``rotary.loc``."""
    d = rotary.k_cache.shape[-1]
    heads = rotary.num_heads + 2 * rotary.num_kv_heads
    if weight.shape[0] != heads * d or d % 2:
        raise ValueError(f"weight of {weight.shape[0]} rows for {heads} heads of {d}")
    if (
        rotary.k_cache.stride(-1) != 1
        or rotary.k_cache.stride(-2) != d
        or rotary.v_cache.stride() != rotary.k_cache.stride()
    ):
        raise ValueError("the KV cache needs [slots, KVH, D] rows of unit stride")
    if rotary.q_norm is not None:
        qk_heads = rotary.num_heads + rotary.num_kv_heads
        c = rotary.counters
        if rotary.k_norm is None or c is None or c.dtype != torch.int32 or c.numel() < qk_heads:
            raise ValueError(f"per-head q/k norms need both weights and {qk_heads} int32 zero counters")
    if norm is not None and norm.weight is not None:
        raise ValueError(
            "the QKV GEMV takes weights with the norm's scale folded in (norm.weight must be None)"
        )
    sumsq, eps = (norm.sumsq, norm.eps) if norm is not None else (None, 0.0)
    return _launch(
        x,
        weight,
        bias,
        x.shape[1],
        config,
        pdl,
        eps=eps,
        rotary=rotary,
        sumsq=sumsq,
        weight_scale=weight_scale,
        weight_zeros=weight_zeros,
        group_size=group_size,
    )[0]


def residual_gemv(
    x: torch.Tensor,  # [M, K], or [M, 2K] = [gate | up] with silu_mul
    weight: torch.Tensor,  # [N, K]
    residual: torch.Tensor,  # [M, N], unit stride along N
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    config: GemvConfig | None = None,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, sumsq)``: ``h = residual + x W^T (+ b)`` (of ``silu(gate) * up`` with ``silu_mul``) rounded as the
    RMSNorm kernel's residual add rounds it, and every program's sum of ``h^2`` over its outputs, ``[M, parts]``
    fp32: what the next projection needs to apply RMSNorm itself (:func:`normed_gemv`), so that the norm needs no
    kernel of its own."""
    if residual.shape != (x.shape[0], weight.shape[0]) or residual.stride(1) != 1:
        raise ValueError(
            f"residual of shape {tuple(residual.shape)} for a [{x.shape[0]}, {weight.shape[0]}] product"
        )
    k = x.shape[1] // 2 if silu_mul else x.shape[1]
    return _launch(x, weight, bias, k, config, pdl, _SILU_MUL if silu_mul else _PLAIN, add_to=residual)


def normed_gemv(
    h: torch.Tensor,  # [M, K]
    norm: NormOfInput,
    weight: torch.Tensor,  # [N, K], the RMSNorm's weight g folded in: W diag(g)
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:  # [M, N]
    """``rstd(h) (h W^T) (+ b)`` with ``rstd = 1 / sqrt(mean(h^2) + eps)`` from ``norm.sumsq``: RMSNorm then the
    projection, for weights with the norm's scale folded in. The loop is the plain GEMV's; only its result is
    scaled. Rounding differs from the separate kernels (which round the normed row to the activation dtype)."""
    if norm.weight is not None:
        raise ValueError(
            "normed_gemv takes weights with the norm's scale folded in (norm.weight must be None)"
        )
    return _launch(h, weight, bias, h.shape[1], config, pdl, eps=norm.eps, sumsq=norm.sumsq)[0]
