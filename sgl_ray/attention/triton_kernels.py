"""Triton split-KV decode over the paged KV pool, and the online-softmax step shared with the extend kernel.

Cached keys and values are read in place through ``req_to_token`` rows (``[max_reqs, max_context]`` slot ids into
the pool's ``[num_slots, num_kv_heads, head_dim]`` buffers); nothing is gathered into a contiguous copy. Softmax
runs online in base 2 (scores times ``scale * log2(e)``) and accumulates in fp32.

Decode (flash-decoding)::

    request i, kv head g:  | split 0 | split 1 | ... | split S-1 |   each `chunk` tokens, a multiple of BLOCK_N
    stage 1, grid (S, KVH, Bd): one program = one split x one kv head x all `group` query heads of that kv head,
        so each K/V block is loaded once per group; it writes the split's normalised output and log2-sum-exp
        (with a single split, the final output directly).
    stage 2, grid (H, Bd): out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max) over the non-empty splits.

Short requests in a long batch get the same number of splits, each at least BLOCK_N tokens. A split past the
sequence's end writes nothing: its stage-1 program returns before waiting for the previous kernel, and stage 2
(which recomputes the same ``chunk``) merges only the written splits. With ``DecodeConfig.prefetch`` (one or two
short requests) a split loads its first block of cached keys and values before that wait, too.

A layer with soft-capped scores (``HAS_CAP``) takes ``cap * tanh(s / cap)`` of each scaled score ``s`` before the
mask (``soft_cap``, in the log2 domain with the cap scaled alike). A layer with a sliding window (``HAS_WINDOW``)
splits only the keys its query sees, ``[seq_len - window, seq_len)`` (clamped at 0), so no program touches a key
before the window. A layer with sinks (``HAS_SINKS``) adds
``2^(sink * log2(e) - max)`` to the softmax denominator once: in stage 2, or at the end of stage 1 when it writes the
output directly. The flags are ``tl.constexpr``: layers without them compile to the kernels they had before.

A windowed layer of hybrid KV pools (``mem_cache.hybrid_swa``) keeps its KV in a pool of its own, indexed by other
slots than the full pool's that ``req_to_token`` holds. With ``HAS_SLOT_MAP`` the kernels read each slot through
the runner's ``full_to_swa`` map, ``slot = full_to_swa[req_to_token[req, pos]]`` (``load_slots``), so a step needs
no translated copy of the table (a per-step gather of every request's row, and a shape that changes with the
longest sequence). The map is written, like the table, before the forward pass starts, so it may be read before
the wait for the previous kernel too.

An FP8 pool (``kv_cache_dtype``) is loaded as stored and widened to the query's dtype in ``online_softmax_step``
(exact); the layer's K scale is folded into ``qk_scale`` and its V scale multiplies each split's normalised output
(the merge is linear in them), so the loop does no extra work per key. Without FP8 both scales are 1.0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sgl_ray.layers.triton_pdl import launch_args, pdl_enter, use_pdl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: full precision rather than tf32
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def soft_cap(x, cap):
    """``cap * tanh(x / cap)``, tanh written with exp2 (``1 - 2 / (e^2y + 1)``: exact limits +-cap for large
    ``|x|``, an absolute error of about one float32 ulp of ``cap`` near 0)."""
    return cap - 2.0 * cap / (tl.exp2(x * (2.0 * 1.4426950408889634 / cap)) + 1.0)


@triton.jit
def online_softmax_step(
    q, k, v, visible, qk_scale, m_i, l_i, acc, IEEE: tl.constexpr, MAYBE_EMPTY: tl.constexpr,
    logit_cap, HAS_CAP: tl.constexpr,
):  # fmt: skip
    """Fold one key block into a running softmax: q [M, D], k/v [N, D], visible [M, N] -> (m_i, l_i, acc).

    ``MAYBE_EMPTY``: a row may see no key of this block or any earlier one (a sliding window's start inside a query
    block); its running max stays -inf, so it is shifted by 0 instead (else exp2(-inf - -inf) = NaN).
    ``HAS_CAP``: the scores are soft-capped at ``logit_cap`` (given in the log2 domain, like the scores)."""
    qk = _dot(q, tl.trans(k.to(q.dtype)), IEEE) * qk_scale  # [M, N], log2 domain
    if HAS_CAP:
        qk = soft_cap(qk, logit_cap)
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(
        m_i, tl.max(qk, 1)
    )  # finite as long as some key of this or an earlier block is visible
    if MAYBE_EMPTY:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), IEEE)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def window_start(seq_len, window, HAS_WINDOW: tl.constexpr):
    """The first key a query at position ``seq_len - 1`` sees."""
    if HAS_WINDOW:
        return tl.maximum(seq_len - window, 0)
    else:
        return 0


@triton.jit
def sink_term(sink, m):
    """``2^(sink * log2(e) - m)``: a sink logit's share of a softmax denominator whose terms are relative to ``m``
    (log2 domain). A sink far above every score gives inf, and the output its limit, 0."""
    return tl.exp2(sink.to(tl.float32) * 1.4426950408889634 - m)


@triton.jit
def load_slots(slot_row, offs, mask, SlotMap, HAS_SLOT_MAP: tl.constexpr):
    """The pool slots of positions ``offs`` of a request's ``req_to_token`` row (masked positions: slot 0), read
    through ``SlotMap`` with ``HAS_SLOT_MAP`` (a hybrid pool's windowed layer: full slot -> its own slot)."""
    slots = tl.load(slot_row + offs, mask=mask, other=0).to(tl.int64)
    if HAS_SLOT_MAP:
        slots = tl.load(SlotMap + slots, mask=mask, other=0).to(tl.int64)
    return slots


# fmt: off
@triton.jit
def _decode_stage1(
    Q, K, V, Out, PartO, PartLse, Sinks, SlotMap,
    req_to_token, req_pool_idxs, dec_row, dec_token, dec_len,
    qk_scale, v_scale, num_splits, group, window, logit_cap,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_r2t, stride_pi, stride_ph,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SLOT_MAP: tl.constexpr,
):
    # fmt: on
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    i = tl.program_id(2)
    # The step's index arrays come from host copies made before the forward pass started (no kernel writes
    # them), so they are read before waiting for the previous kernel (see triton_pdl); q, this step's K/V row and
    # the outputs after.
    token = tl.load(dec_token + i).to(tl.int64)
    seq_len = tl.load(dec_len + i)
    req = tl.load(req_pool_idxs + tl.load(dec_row + i)).to(tl.int64)
    lo = window_start(seq_len, window, HAS_WINDOW)  # the splits cover keys lo .. seq_len
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    if start >= seq_len:  # a split past the end: nothing to write (stage 2 reads only the others), so no wait
        return
    end = tl.minimum(start + chunk, seq_len)
    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * group + offs_h  # [BLOCK_H], the first `group` are real
    mask_h = offs_h < group
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    slot_row = req_to_token + req * stride_r2t
    k_head = K + kv_head * stride_kh
    v_head = V + kv_head * stride_vh
    n_first = start
    if PREFETCH:
        # Every cached key and value but this step's own token (position seq_len - 1, stored by an earlier
        # kernel of this step) was written by an earlier step, and those rows stay as they are while the request
        # lives. So the split's first block of them is loaded before the wait: its DRAM round trip overlaps the
        # previous kernel instead of following it.
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = load_slots(slot_row, offs_n, mask_n, SlotMap, HAS_SLOT_MAP)
        early = (offs_n < seq_len - 1)[:, None] & mask_d[None, :]
        k_first = tl.load(k_head + slots[:, None] * stride_kt + offs_d[None, :], mask=early, other=0.0)
        v_first = tl.load(v_head + slots[:, None] * stride_vt + offs_d[None, :], mask=early, other=0.0)
    pdl_enter(USE_PDL)

    q_mask = mask_h[:, None] & mask_d[None, :]
    q = tl.load(Q + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    if PREFETCH:  # the new token's row, where it falls in the first block, then that block
        late = (offs_n == seq_len - 1)[:, None] & mask_d[None, :]
        k_late = tl.load(k_head + slots[:, None] * stride_kt + offs_d[None, :], mask=late, other=0.0)
        v_late = tl.load(v_head + slots[:, None] * stride_vt + offs_d[None, :], mask=late, other=0.0)
        k_first = tl.where(late, k_late, k_first)
        v_first = tl.where(late, v_late, v_first)
        m_i, l_i, acc = online_softmax_step(
            q, k_first, v_first, mask_n[None, :], qk_scale, m_i, l_i, acc, IEEE, False, logit_cap, HAS_CAP
        )
        n_first = start + BLOCK_N
    for n0 in range(n_first, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = load_slots(slot_row, offs_n, mask_n, SlotMap, HAS_SLOT_MAP)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_head + slots[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_head + slots[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = online_softmax_step(
            q, k, v, mask_n[None, :], qk_scale, m_i, l_i, acc, IEEE, False, logit_cap, HAS_CAP
        )
    if DIRECT and HAS_SINKS:  # the final output: the sinks join its denominator here
        l_i += sink_term(tl.load(Sinks + heads, mask=mask_h, other=0.0), m_i)
    o = acc / l_i[:, None] * v_scale
    if DIRECT:
        tl.store(Out + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :], o, mask=q_mask)
    else:
        part = i.to(tl.int64) * stride_pi + heads * stride_ph + split  # [BLOCK_H] rows of [Bd * H * S, D]
        tl.store(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=q_mask)
        tl.store(PartLse + part, m_i + tl.log2(l_i), mask=mask_h)


# fmt: off
@triton.jit
def _decode_reduce(
    Out, PartO, PartLse, Sinks, dec_token, dec_len,
    num_splits, window, stride_ot, stride_oh, stride_pi, stride_ph,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    # fmt: on
    head = tl.program_id(0)
    i = tl.program_id(1)
    token = tl.load(dec_token + i).to(tl.int64)  # host-copied indices: read before the wait, as in stage 1
    seq_len = tl.load(dec_len + i)
    pdl_enter(USE_PDL)
    span = seq_len - window_start(seq_len, window, HAS_WINDOW)
    chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < tl.cdiv(span, chunk)  # exactly the splits stage 1 wrote
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    part = i.to(tl.int64) * stride_pi + head * stride_ph + offs_s  # [BLOCK_S]
    lse = tl.load(PartLse + part, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(mask_s, tl.exp2(lse - m), 0.0)
    o = tl.load(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    denominator = tl.sum(w, 0)
    if HAS_SINKS:
        denominator += sink_term(tl.load(Sinks + head), m)
    o = tl.sum(w[:, None] * o, 0) / denominator
    tl.store(Out + token * stride_ot + head * stride_oh + offs_d, o, mask=mask_d)


def decode_block_n(head_dim: int, dtype: torch.dtype) -> int:
    """Keys per stage-1 iteration (also the split granularity)."""
    return 32 if head_dim > 128 or dtype == torch.float32 else 64


class DecodeConfig(NamedTuple):
    """Launch shape of stage 1: keys per iteration (also the split granularity), warps, pipeline depth, and
    whether each split loads its first block of cached keys and values before it waits for the previous kernel."""

    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    prefetch: bool = False


SMALL_DECODE_BATCH = 4
SHORT_DECODE_BATCH = 2
SHORT_DECODE_TOKENS = 1024  # requests x longest sequence: at most 256 prefetching programs of 8 KV heads
SMALL_DECODE = DecodeConfig(128, num_warps=4, num_stages=2)
SHORT_DECODE = DecodeConfig(32, num_warps=4, num_stages=2, prefetch=True)
LARGE_DECODE = DecodeConfig(64, num_warps=4, num_stages=3)


def short_decode_len(num_decode: int, head_dim: int, dtype: torch.dtype) -> int:
    """The longest sequence for which a batch of ``num_decode`` requests takes ``SHORT_DECODE`` (0: none; fp32
    and heads wider than 128 keep their one narrow shape at any length)."""
    if num_decode > SHORT_DECODE_BATCH or decode_block_n(head_dim, dtype) < 64:
        return 0
    return SHORT_DECODE_TOKENS // num_decode


def decode_config(
    head_dim: int, dtype: torch.dtype, num_decode: int = 1, max_seq_len: int | None = None
) -> DecodeConfig:
    """Stage-1 launch shape for a decode batch whose sequences are at most ``max_seq_len`` long (``None``: any).

    Measured on an H200 (8B shape, bf16, CUDA graphs): a third pipeline stage reads KV 13-16% faster at batches
    of 32-256 (up to 4.2 TB/s, the card's copy rate); at a handful of requests the grid is small and 128 keys per
    step with two stages does best. At one or two requests of up to ``SHORT_DECODE_TOKENS`` tokens together,
    32-key splits that load their keys and values before waiting for the previous kernel save 50-85 us per step;
    with more programs waiting on loaded tiles (bs1 at 4096 tokens, bs2 at 1024, batches of 64) that costs
    30-600 us, so those keep the other shapes."""
    block_n = decode_block_n(head_dim, dtype)
    if block_n < 64:  # fp32 or wide heads: keep the shared-memory footprint of two stages
        return DecodeConfig(block_n)
    if max_seq_len is not None and max_seq_len <= short_decode_len(num_decode, head_dim, dtype):
        return SHORT_DECODE
    return SMALL_DECODE if num_decode <= SMALL_DECODE_BATCH else LARGE_DECODE


def decode_attention(
    q: torch.Tensor,  # [T, H, D]
    k_buf: torch.Tensor,  # [num_slots, KVH, D]
    v_buf: torch.Tensor,
    out: torch.Tensor,  # [T, H, D]; the decode rows are written
    req_to_token: torch.Tensor,  # [max_reqs, max_context]
    req_pool_idxs: torch.Tensor,  # [B]
    dec_row: torch.Tensor,  # [Bd] batch row of each decode request
    dec_token: torch.Tensor,  # [Bd] its token row in q / out
    dec_len: torch.Tensor,  # [Bd] its sequence length (cached + the new token)
    num_splits: int,  # a power of two
    scale: float,
    new_buffer,  # (shape, dtype) -> uninitialised tensor on q's device
    config: DecodeConfig | None = None,
    window: int | None = None,  # the layer's sliding window (None: full attention)
    sinks: torch.Tensor | None = None,  # [H] the layer's sink logits
    logit_cap: float | None = None,  # the layer's score soft cap (None: none)
    k_scale: float = 1.0,  # an FP8 pool's scales: a stored key means key * k_scale
    v_scale: float = 1.0,
    slot_map: torch.Tensor | None = None,  # [num_slots] int64 the table's slot -> the pool's (hybrid pools)
) -> None:
    num_decode = dec_row.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buf.shape[1]
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    config = config or decode_config(head_dim, q.dtype, num_decode)
    block_n = config.block_n
    ieee = q.dtype == torch.float32
    direct = num_splits == 1
    pdl = use_pdl(q)
    if direct:
        part_o = part_lse = out  # unused
    else:
        part_o = new_buffer((num_decode, num_heads, num_splits, head_dim), torch.float32)
        part_lse = new_buffer((num_decode, num_heads, num_splits), torch.float32)
    # fmt: off
    _decode_stage1[(num_splits, num_kv_heads, num_decode)](
        q, k_buf, v_buf, out, part_o, part_lse, q if sinks is None else sinks,
        req_to_token if slot_map is None else slot_map, req_to_token, req_pool_idxs, dec_row, dec_token, dec_len,
        scale * k_scale * LOG2E, v_scale, num_splits, group, window or 0, (logit_cap or 0.0) * LOG2E,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0), num_heads * num_splits, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        DIRECT=direct, IEEE=ieee, USE_PDL=pdl, PREFETCH=config.prefetch,
        HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None, HAS_CAP=logit_cap is not None,
        HAS_SLOT_MAP=slot_map is not None, num_warps=config.num_warps, num_stages=config.num_stages, **launch_args(pdl),
    )
    # fmt: on
    if not direct:
        # fmt: off
        _decode_reduce[(num_heads, num_decode)](
            out, part_o, part_lse, q if sinks is None else sinks, dec_token, dec_len,
            num_splits, window or 0, out.stride(0), out.stride(1), num_heads * num_splits, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_S=num_splits, USE_PDL=pdl,
            HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None, num_warps=4, **launch_args(pdl),
        )
        # fmt: on
