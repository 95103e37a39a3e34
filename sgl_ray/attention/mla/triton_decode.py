"""Triton split-KV decode for MLA, absorbed: H query heads against the latent pool, read in place.

The query of head h is ``[q_c | q_pe]`` (``q_c = W_UK^T q_nope``, width C = kv_lora_rank; ``q_pe`` width R); each
cached slot holds ``[c | k_pe]``. Scores are ``q_c . c + q_pe . k_pe`` (two dots, so neither operand is padded to
a power of two of C + R); values are the ``c`` tiles already loaded for the scores. Softmax runs online in base 2
and accumulates in fp32, as the dense decode kernel (``sgl_ray.attention.triton_kernels``)::

    request i:  | split 0 | split 1 | ... | split S-1 |   each `chunk` tokens, a multiple of BLOCK_N
    stage 1, grid (S, ceil(H / BLOCK_H), Bd): one program = one split x BLOCK_H heads of one request, so each
        latent tile is loaded once for BLOCK_H heads; it writes the split's normalised output [BLOCK_H, C] and its
        log2-sum-exp (with one split, the final output directly).
    stage 2, grid (H, Bd): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max) over the non-empty splits.

A split past a sequence's end writes nothing and stage 2 (which recomputes the same ``chunk``) skips it, so a CUDA
graph captured for the longest sequence serves shorter ones. Row ``i`` of the query and output tensors is decode
request ``i`` (the caller gathers the decode rows of a mixed batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgl_ray.attention.triton_kernels import LOG2E, _dot
from sgl_ray.layers.triton_pdl import launch_args, pdl_enter, use_pdl

BLOCK_H = 16  # query heads per program (tl.dot's smallest M)


# fmt: off
@triton.jit
def _mla_decode_stage1(
    Qc, Qr, Latents, Out, PartO, PartLse,
    req_to_token, req_pool_idxs, dec_row, dec_len,
    qk_scale, num_splits, num_heads,
    stride_qct, stride_qch, stride_qrt, stride_qrh, stride_lt, stride_ot, stride_oh,
    stride_r2t, stride_pi, stride_ph,
    LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # fmt: on
    split = tl.program_id(0)
    head_block = tl.program_id(1)
    i = tl.program_id(2)
    # The step's index arrays are host copies no kernel writes: read before waiting for the previous kernel.
    seq_len = tl.load(dec_len + i)
    req = tl.load(req_pool_idxs + tl.load(dec_row + i)).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    if start >= seq_len:  # a split past the end: stage 2 reads only the others
        return
    end = tl.minimum(start + chunk, seq_len)
    pdl_enter(USE_PDL)

    row = i.to(tl.int64)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = heads < num_heads
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < LORA
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < ROPE
    q_c = tl.load(
        Qc + row * stride_qct + heads[:, None] * stride_qch + offs_c[None, :],
        mask=mask_h[:, None] & mask_c[None, :], other=0.0,
    )  # [BLOCK_H, BLOCK_C]
    q_r = tl.load(
        Qr + row * stride_qrt + heads[:, None] * stride_qrh + offs_r[None, :],
        mask=mask_h[:, None] & mask_r[None, :], other=0.0,
    )  # [BLOCK_H, BLOCK_R]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    slot_row = req_to_token + req * stride_r2t
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(slot_row + offs_n, mask=mask_n, other=0).to(tl.int64)
        lat = Latents + slots[:, None] * stride_lt
        c = tl.load(lat + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # [N, C]
        k_pe = tl.load(lat + LORA + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        qk = _dot(q_c, tl.trans(c.to(q_c.dtype)), IEEE) + _dot(q_r, tl.trans(k_pe.to(q_r.dtype)), IEEE)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # [BLOCK_H, N], log2 domain
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every block holds a key
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None] + _dot(p.to(q_c.dtype), c.to(q_c.dtype), IEEE)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    o = acc / l_i[:, None]
    o_mask = mask_h[:, None] & mask_c[None, :]
    if DIRECT:
        tl.store(Out + row * stride_ot + heads[:, None] * stride_oh + offs_c[None, :], o, mask=o_mask)
    else:
        part = row * stride_pi + heads * stride_ph + split  # [BLOCK_H] rows of [Bd * H * S, C]
        tl.store(PartO + part[:, None] * LORA + offs_c[None, :], o, mask=o_mask)
        tl.store(PartLse + part, m_i + tl.log2(l_i), mask=mask_h)


# fmt: off
@triton.jit
def _mla_decode_reduce(
    Out, PartO, PartLse, dec_len,
    num_splits, stride_ot, stride_oh, stride_pi, stride_ph,
    LORA: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # fmt: on
    head = tl.program_id(0)
    i = tl.program_id(1)
    seq_len = tl.load(dec_len + i)  # a host copy: read before the wait, as in stage 1
    pdl_enter(USE_PDL)
    row = i.to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < tl.cdiv(seq_len, chunk)  # exactly the splits stage 1 wrote
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < LORA
    part = row * stride_pi + head * stride_ph + offs_s  # [BLOCK_S]
    lse = tl.load(PartLse + part, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(mask_s, tl.exp2(lse - m), 0.0)
    o = tl.load(PartO + part[:, None] * LORA + offs_c[None, :], mask=mask_s[:, None] & mask_c[None, :], other=0.0)
    o = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(Out + row * stride_ot + head * stride_oh + offs_c, o, mask=mask_c)


def mla_block_n(latent_dim: int, dtype: torch.dtype) -> int:
    """Latents per stage-1 iteration (also the split granularity): a [BLOCK_N, C] tile per pipeline stage."""
    return 16 if dtype == torch.float32 or latent_dim > 1024 else 32


def mla_decode_attention(
    q_c: torch.Tensor,  # [Bd, H, C] absorbed queries (any strides, unit last)
    q_pe: torch.Tensor,  # [Bd, H, R] rotated
    latents: torch.Tensor,  # [num_slots, C + R] the layer's pool buffer
    out: torch.Tensor,  # [Bd, H, C] (any strides, unit last)
    req_to_token: torch.Tensor,  # [max_reqs, max_context]
    req_pool_idxs: torch.Tensor,  # [B]
    dec_row: torch.Tensor,  # [Bd] batch row of each decode request
    dec_len: torch.Tensor,  # [Bd] its sequence length (cached + the new token)
    num_splits: int,  # a power of two
    scale: float,
    new_buffer,  # (shape, dtype) -> uninitialised tensor on q's device
) -> None:
    """Row ``i`` of ``out``: decode request ``i``'s attention output in latent space (``W_UV`` not applied)."""
    num_decode, num_heads, lora = q_c.shape
    assert q_c.stride(2) == q_pe.stride(2) == out.stride(2) == latents.stride(1) == 1, "rows must be dense"
    rope = q_pe.shape[2]
    # tl.dot takes no dimension under 16
    block_c, block_r = max(16, triton.next_power_of_2(lora)), max(16, triton.next_power_of_2(rope))
    block_n = mla_block_n(lora + rope, q_c.dtype)
    ieee = q_c.dtype == torch.float32
    direct = num_splits == 1
    pdl = use_pdl(q_c)
    if direct:
        part_o = part_lse = out  # unused
    else:
        part_o = new_buffer((num_decode, num_heads, num_splits, lora), torch.float32)
        part_lse = new_buffer((num_decode, num_heads, num_splits), torch.float32)
    grid = (num_splits, triton.cdiv(num_heads, BLOCK_H), num_decode)
    # fmt: off
    _mla_decode_stage1[grid](
        q_c, q_pe, latents, out, part_o, part_lse,
        req_to_token, req_pool_idxs, dec_row, dec_len,
        scale * LOG2E, num_splits, num_heads,
        q_c.stride(0), q_c.stride(1), q_pe.stride(0), q_pe.stride(1), latents.stride(0),
        out.stride(0), out.stride(1), req_to_token.stride(0), num_heads * num_splits, num_splits,
        LORA=lora, ROPE=rope, BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_H=BLOCK_H, BLOCK_N=block_n,
        DIRECT=direct, IEEE=ieee, USE_PDL=pdl,
        num_warps=8 if block_c >= 512 else 4, num_stages=2, **launch_args(pdl),
    )
    # fmt: on
    if not direct:
        # fmt: off
        _mla_decode_reduce[(num_heads, num_decode)](
            out, part_o, part_lse, dec_len,
            num_splits, out.stride(0), out.stride(1), num_heads * num_splits, num_splits,
            LORA=lora, BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_S=num_splits, USE_PDL=pdl,
            num_warps=4, **launch_args(pdl),
        )
        # fmt: on
