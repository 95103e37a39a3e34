"""The inner parts of the one-row GEMV (:mod:`sgl_ray.layers.triton_gemv`): how a step's input columns are read
(plain, RMSNorm with the residual add, or SiLU-and-mul: the prologues), how a weight tile's products accumulate, and
the products of INT4 rows decoded from their packed words as they stream in."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def accumulate(acc, w, x, LANE_ACC: tl.constexpr):
    """Add the products of a weight tile w [BLOCK_N, BLOCK_K] and the rows x [M_PAD, BLOCK_K] to acc."""
    prod = w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]  # [M_PAD, BLOCK_N, BLOCK_K]
    if LANE_ACC:
        return acc + prod
    else:
        return acc + tl.sum(prod, axis=2)


@triton.jit
def residual_sum(X, R, x_rows, r_rows, offs_k, mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual), rounded to the activation dtype as the torch path does: [M_PAD, BLOCK_K]."""
    x = tl.load(X + x_rows + offs_k[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + r_rows + offs_k[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def gemv_input(
    X, R, NormW, x_rows, r_rows, offs_k, mask, rstd, K,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """The GEMV's input columns ``offs_k`` of every row: x itself, RMSNorm(x + residual) (rstd [M_PAD] known),
    or silu(gate) * up of x = [gate | up] (K = its width); each step rounded like the separate kernels."""
    if PROLOGUE == 2:
        gate = tl.load(X + x_rows + offs_k[None, :], mask=mask, other=0.0)
        up = tl.load(X + x_rows + K + offs_k[None, :], mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    elif PROLOGUE == 1:
        x = residual_sum(X, R, x_rows, r_rows, offs_k, mask, HAS_RESIDUAL)
        y = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
        nw = tl.load(NormW + offs_k, mask=offs_k < K, other=0.0)
        return (nw.to(tl.float32)[None, :] * y.to(tl.float32)).to(x.dtype)
    else:
        return tl.load(X + x_rows + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def int4_rows(
    X, R, NormW, x_rows, r_rows, Wq, WScale, WZero, offs_n, mask_n, mask_m, rstd, K, num_groups, group_size,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PROLOGUE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """``[M_PAD, BLOCK_N]`` products of the input rows with INT4 rows ``offs_n`` (int32 words [N, K / 8], value
    ``c`` of a row in bits ``4 (c % 8)`` of word ``c // 8``; per-group scales and uint8 zero points [N, G]).
    ``BLOCK_W`` words of each row per step; a word's eight values lie in one group, so each lane sums
    ``(q - z) x`` over its word and scales that once. A nibble OR-ed into the mantissa of 2^23 reads as the float
    2^23 + q, so ``(2^23 + q) - (2^23 + z)`` decodes it exactly with no integer-to-float conversion."""
    words = K // 8
    q_rows = Wq + offs_n.to(tl.int64)[:, None] * words  # [BLOCK_N, 1]
    g_rows = offs_n[:, None] * num_groups
    rw = tl.arange(0, BLOCK_W)
    acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_W], dtype=tl.float32)
    for w0 in range(0, words, BLOCK_W):
        w_at = w0 + rw
        w_ok = w_at < words
        wmask = mask_n[:, None] & w_ok[None, :]
        packed = tl.load(q_rows + w_at[None, :], mask=wmask, other=0)  # [BLOCK_N, BLOCK_W]
        at = g_rows + ((w_at * 8) // group_size)[None, :]
        s = tl.load(WScale + at, mask=wmask, other=0.0).to(tl.float32)
        zf = tl.load(WZero + at, mask=wmask, other=0).to(tl.float32) + 8388608.0
        part = tl.zeros([M_PAD, BLOCK_N, BLOCK_W], dtype=tl.float32)
        for i in tl.static_range(8):
            x = gemv_input(
                X, R, NormW, x_rows, r_rows, w_at * 8 + i, mask_m[:, None] & w_ok[None, :], rstd, K,
                PROLOGUE, HAS_RESIDUAL,
            )  # fmt: skip
            qi = (((packed >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zf
            part += qi[None, :, :] * x.to(tl.float32)[:, None, :]
        acc += part * s[None, :, :]
    return tl.sum(acc, axis=2)
