"""Fused Triton kernels run by Triton's CPU interpreter, so their indexing and masking are checked without a GPU
(the GPU machine runs the same checks natively: ``pytest -m gpu``)."""

from __future__ import annotations

import pytest

# The interpreter runs every program of a launch in Python, so its time grows with the grid: the GEMV checks take
# shapes of the GPU tests' residues (K ragged or even for every config's BLOCK_K, N a multiple of BLOCK_N or not,
# N > K where the GPU test has it) at a fraction of their programs. (N, K) = (4096, 576) of check_gemv becomes
# (128, 576): even K for BLOCK_K 64 without bias (the one such case), every BLOCK_N dividing N; (100, 1000) of
# check_fused_gemvs becomes (36, 232): K ragged for every BLOCK_K, N ragged for BLOCK_N 8 and even for 4.
_SCRIPT = """
import torch
from sgl_ray.layers import triton_ops
from sgl_ray.layers.rotary import RotaryEmbedding, rotate_half
from tests.gpu.test_fused_ops import (
    check_fused_gemvs, check_gemv, check_norm_in_gemvs, check_qkv_rotary_store_gemv,
    check_quantized_gemvs, check_rotary_store,
)
check_gemv("cpu", torch.float16, shapes=[(37, 100, False), (64, 1024, True), (128, 576, False), (5, 3000, True)])
check_fused_gemvs("cpu", torch.float16, shapes=[(48, 256), (36, 232)])
check_quantized_gemvs("cpu", torch.float16, shapes=[(36, 224)])
for shape in [(4, 2, 16), (9, 3, 64)]:
    check_rotary_store("cpu", torch.float32, *shape)
    check_rotary_store("cpu", torch.float32, *shape, norms=True)
for shape in [(4, 1, 16), (4, 2, 32)]:  # one KV head and several; heads of 16 and 32 (2-8 programs per head)
    check_qkv_rotary_store_gemv("cpu", torch.float16, *shape)
check_qkv_rotary_store_gemv("cpu", torch.float16, 4, 1, 16, norms=True)
# the producer's K (96 here, 160 on the GPU): ragged for the default BLOCK_K and 64, even for 32; the consumer's N
# (208 here, 400 on the GPU): every BLOCK_N divides it, and it exceeds its K (192)
check_norm_in_gemvs("cpu", torch.float16, inner=96, out_rows=192 + 16)
rope = RotaryEmbedding(32, {"rope_theta": 10000.0}, 512)
cos, sin = rope.cos_sin(torch.randint(0, 512, (5,)), torch.float32)
qkv = torch.randn(5, 8 * 32)
qk = qkv[:, : 6 * 32].view(5, 6, 32)  # strided, as the model passes it
torch.testing.assert_close(triton_ops.rotary(qk, cos, sin), qk * cos + rotate_half(qk) * sin, atol=1e-5, rtol=1e-5)
"""


def test_rotary_and_gemv_kernels_in_the_interpreter(triton_interpreter):
    error = triton_interpreter.run(_SCRIPT)
    assert not error, error[-3000:]


_ATTENTION = """
import numpy as np, torch
from sgl_ray.attention.triton_backend import TritonAttentionBackend
from tests.gpu.test_triton_attention import check, make_batch, make_case
# decode and extend rows mixed, in counts whose packed metadata would start arrays at every 4-byte offset
for ext, prefix in [([1, 5, 1, 70, 1], [30, 0, 100, 10, 3]), ([1, 1, 1, 9, 66, 2, 1], [7, 64, 0, 20, 1, 5, 130])]:
    case = make_case(np.array(prefix), np.array(ext), 4, 2, 32, torch.float32, device="cpu", seed=len(ext))
    meta = make_batch(case, case.pool, TritonAttentionBackend("cpu")).attn_metadata
    arrays = [meta.decode.rows, meta.decode.tokens, meta.decode.seq_lens, *meta.extend.blocks.unbind(0)]
    assert all(a.data_ptr() % 16 == 0 for a in arrays), "a kernel variant per alignment would be compiled"
    check(case)
# decode alone with forced splits, some of them past a short sequence's end (empty, skipped by the merge); at 64
# the 300-token request writes 10 of them, the 1-token one 1
seq = np.array([1, 200, 77, 300])
for splits in (2, 8, 64):
    check(make_case(seq - 1, np.ones_like(seq), 4, 2, 32, torch.float32, device="cpu", seed=splits), splits)
# two short fp16 requests: the 32-key splits that load their cached K/V before the wait (SHORT_DECODE)
seq = np.array([33, 300])
check(make_case(seq - 1, np.ones_like(seq), 4, 2, 32, torch.float16, device="cpu", seed=5))
"""


def test_attention_kernels_in_the_interpreter(triton_interpreter):
    """Decode (split-KV) and extend over a cached prefix, against the torch backend."""
    error = triton_interpreter.run(_ATTENTION)
    assert not error, error[-3000:]


_SINKS_WINDOW = """
import numpy as np, torch
from tests.gpu.test_triton_attention import check, make_case

def case(prefix, ext, window, sinks, dtype=torch.float32, seed=0):
    return make_case(
        np.array(prefix), np.array(ext), 4, 2, 32, dtype, device="cpu", seed=seed, sliding_window=window, sinks=sinks
    )

# decode: the sinks in stage 1 (one split) and in the merge; windows of 1, 16 and 50 keys over 1 .. 200
seq = np.array([1, 40, 77, 200])
for splits, window, sinks in [(1, 50, True), (4, 50, True), (8, 16, False), (2, None, True), (4, 1, True)]:
    check(case(seq - 1, np.ones_like(seq), window, sinks, seed=splits), splits)
# extend over cached prefixes (a window starting inside the prefix, a second query block) mixed with decode rows
for window, sinks in [(30, True), (1, True), (1000, False), (None, True), (64, False)]:
    check(case([30, 0, 100, 10, 3], [1, 5, 9, 70, 1], window, sinks, seed=7))
# two short fp16 requests: the splits that load their first block before the wait (SHORT_DECODE)
seq = np.array([33, 300])
check(case(seq - 1, np.ones_like(seq), 40, True, dtype=torch.float16, seed=5))
"""


def test_sliding_window_and_sink_kernels_in_the_interpreter(triton_interpreter):
    """Decode and extend of layers with a sliding window and/or attention sinks, against the dense softmax."""
    error = triton_interpreter.run(_SINKS_WINDOW)
    assert not error, error[-3000:]


_SOFT_CAP = """
import numpy as np, torch
from tests.gpu.test_triton_attention import check, make_case

def case(prefix, ext, window, dtype=torch.float32, seed=0):
    return make_case(
        np.array(prefix), np.array(ext), 4, 2, 32, dtype, device="cpu", seed=seed, sliding_window=window,
        logit_cap=2.0,
    )

# decode: one split (stage 1 writes the output) and several (the merge), with and without a window
seq = np.array([1, 40, 77, 200])
for splits, window in [(1, None), (4, None), (4, 16)]:
    check(case(seq - 1, np.ones_like(seq), window, seed=splits), splits)
# extend over cached prefixes mixed with decode rows; a window starting inside the prefix
for window in (None, 30):
    check(case([30, 0, 100, 10, 3], [1, 5, 9, 70, 1], window, seed=8))
# two short fp16 requests: the splits that load their first block before the wait (SHORT_DECODE)
seq = np.array([33, 300])
check(case(seq - 1, np.ones_like(seq), None, dtype=torch.float16, seed=5))
"""


def test_soft_capped_score_kernels_in_the_interpreter(triton_interpreter):
    """Decode and extend of a layer whose scores are soft-capped (Gemma 2), against the dense softmax."""
    error = triton_interpreter.run(_SOFT_CAP)
    assert not error, error[-3000:]


def test_short_sequence_decode_graphs_are_asked_for_small_batches():
    pytest.importorskip("triton")
    import torch

    from sgl_ray.attention.triton_backend import TritonAttentionBackend
    from sgl_ray.attention.triton_kernels import SHORT_DECODE, SHORT_DECODE_TOKENS, decode_config

    backend = TritonAttentionBackend("cpu")
    bf16 = (128, torch.bfloat16)
    assert backend.graph_seq_lens(1, 8192, *bf16) == (SHORT_DECODE_TOKENS, 8192)
    assert backend.graph_seq_lens(2, 8192, *bf16) == (SHORT_DECODE_TOKENS // 2, 8192)
    assert backend.graph_seq_lens(4, 8192, *bf16) == (8192,)
    assert backend.graph_seq_lens(1, SHORT_DECODE_TOKENS, *bf16) == (SHORT_DECODE_TOKENS,)
    # fp32 and wide heads run one narrow shape at any length: one graph per batch size is enough.
    assert backend.graph_seq_lens(1, 8192, 128, torch.float32) == (8192,)
    assert backend.graph_seq_lens(1, 8192, 256, torch.bfloat16) == (8192,)
    assert decode_config(128, torch.float32, 1, 64) == decode_config(128, torch.float32, 1, 8192)
    assert decode_config(128, torch.bfloat16, 1, SHORT_DECODE_TOKENS) == SHORT_DECODE
    assert decode_config(128, torch.bfloat16, 2, SHORT_DECODE_TOKENS // 2) == SHORT_DECODE
    assert not decode_config(128, torch.bfloat16, 1, SHORT_DECODE_TOKENS + 1).prefetch
    assert not decode_config(128, torch.bfloat16, 2, SHORT_DECODE_TOKENS // 2 + 1).prefetch
    assert not decode_config(128, torch.bfloat16, 1).prefetch  # no bound known
    assert not decode_config(128, torch.bfloat16, 4, 100).prefetch
    assert not decode_config(128, torch.float32, 1, 100).prefetch
