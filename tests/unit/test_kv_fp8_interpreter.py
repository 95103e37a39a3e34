"""The Triton attention kernels over an FP8 KV pool (``kv_cache_dtype``) under Triton's CPU interpreter, which
loads and widens e4m3 and e5m2: decode (one split, several, the prefetching short shape) and extend over an FP8
prefix mixed with decode rows, against the dense softmax over the dequantized pool, and the torch backend on the
same cases (the GPU machine runs larger ones natively: ``tests/gpu/test_kv_fp8_attention.py``)."""

from __future__ import annotations

_SCRIPT = """
import numpy as np, torch
from tests.gpu.test_kv_fp8_attention import check_fp8, make_fp8_case, run_torch, run_triton

def case(prefix, ext, kv_dtype, dtype=torch.float32, seed=0, **layer):
    return make_fp8_case(prefix, ext, 4, 2, 32, dtype, kv_dtype, device="cpu", seed=seed, **layer)

for kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    # decode alone: one split (stage 1 writes the output) and four (the merge; the 1-token request's 3 are empty)
    seq = np.array([1, 40, 130])
    for splits in (1, 4):
        check_fp8(case(seq - 1, np.ones_like(seq), kv_dtype, seed=splits), lambda c, s=splits: run_triton(c, s))
    # extend over FP8 prefixes (a second query block) mixed with decode rows; the torch backend on the same case
    for run in (run_triton, run_torch):
        check_fp8(case([30, 0, 9, 3], [1, 70, 5, 1], kv_dtype, seed=7), run)
# fp16 queries, two short requests: the splits that load their first FP8 block before the wait (SHORT_DECODE)
seq = np.array([33, 100])
check_fp8(case(seq - 1, np.ones_like(seq), torch.float8_e4m3fn, torch.float16, seed=5))
# a layer with a sliding window and sinks (the torch backend's explicit softmax)
for run in (run_triton, run_torch):
    check_fp8(case([30, 0, 3], [1, 9, 1], torch.float8_e4m3fn, seed=8, sliding_window=16, sinks=True), run)
"""


def test_fp8_kv_attention_kernels_in_the_interpreter(triton_interpreter):
    error = triton_interpreter.run(_SCRIPT)
    assert not error, error[-3000:]
