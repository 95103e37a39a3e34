"""The Triton attention kernels of a windowed layer in hybrid KV pools, reading the full-slot request table through
the ``full_to_swa`` map, under Triton's CPU interpreter: ragged decode (one split, several, the prefetching short
shape, a decode graph's metadata) and extend over cached prefixes mixed with decode rows, with a map that is no
permutation of the identity and poisons what the window no longer reaches; against the dense softmax and, bit for
bit, the same kernels on the translated table (the GPU machine runs larger cases natively:
``tests/gpu/test_triton_attention_swa_map.py``)."""

from __future__ import annotations

_SCRIPT = """
import numpy as np, torch
from tests.gpu.test_triton_attention_swa_map import check_hybrid, windowed_case
from tests.gpu.test_kv_fp8_attention import check_fp8, fp8_case
from tests.gpu.test_triton_attention_swa_map import hybrid_table, run_hybrid

def case(prefix, ext, window, dtype=torch.float32, seed=0, **layer):
    return windowed_case(prefix, ext, 4, 2, 32, dtype, window, device="cpu", seed=seed, **layer)

# decode: one split (stage 1 writes the output) and several (the merge); windows inside and past the sequences
seq = np.array([1, 40, 77, 200])
for splits, window, sinks in [(1, 50, True), (4, 16, False), (8, 300, True)]:
    check_hybrid(case(seq - 1, np.ones_like(seq), window, seed=splits, sinks=sinks), splits, seed=splits)
# a decode graph's metadata (the split count fixed for its longest sequence)
check_hybrid(case(seq - 1, np.ones_like(seq), 30, seed=9), graph_len=512)
# two short fp16 requests: the splits that load their first block before the wait (SHORT_DECODE)
seq = np.array([33, 300])
check_hybrid(case(seq - 1, np.ones_like(seq), 40, dtype=torch.float16, seed=5))
# extend over cached prefixes (a window starting inside the prefix, a second query block) mixed with decode rows
for window in (1, 30, 1000):
    check_hybrid(case([30, 0, 100, 10, 3], [1, 5, 9, 70, 1], window, seed=7), seed=window)
# an FP8 pool: the extend reads the new tokens back from the pool, at their mapped slots
fp8 = fp8_case(case([30, 0, 3], [1, 9, 1], 16, seed=8), torch.float8_e4m3fn)
table = hybrid_table(fp8, seed=2)
check_fp8(fp8, run_hybrid(table))
torch.testing.assert_close(run_hybrid(table)(fp8), run_hybrid(table, translated=True)(fp8), atol=0, rtol=0)
"""


def test_swa_map_kernels_in_the_interpreter(triton_interpreter):
    error = triton_interpreter.run(_SCRIPT)
    assert not error, error[-3000:]


# The engine in the same interpreter process: a tiny Gemma 2 (windowed, full, windowed layers; window 16) whose
# windowed layers' pool holds a quarter of the full pool's 256 tokens, three prompts longer than the window in
# 16-token prefill chunks, then decode past a few pages (page size 4) while the SWA pool runs full and its pages are
# recycled. The torch backend on the same pools reads the table translated beforehand.
_ENGINE = """
import torch
import sgl_ray
g = torch.Generator().manual_seed(3)
prompts = [torch.randint(10, 40000, (n,), generator=g).tolist() for n in (37, 9, 50)]
params = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}
opts = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, page_size=4, chunked_prefill_size=16,
            max_total_tokens=128, swa_full_tokens_ratio=0.25)
tokens = {}
for backend in ("torch", "triton"):
    with sgl_ray.Engine(PATH, attention_backend=backend, **opts) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        tokens[backend] = [o["output_ids"] for o in outs]
        kv = engine._core.scheduler.kv
        assert engine._core.runner.full_to_swa is not None and kv.swa_capacity == 64 and kv.capacity == 256
        assert kv.peak_swa_held == kv.swa_capacity < kv.peak_held, (kv.peak_swa_held, kv.peak_held)
assert tokens["triton"] == tokens["torch"], tokens
"""


def test_engine_with_hybrid_pools_in_the_interpreter(triton_interpreter, tmp_path):
    """attention_backend="triton" on hybrid pools (its kernels reading the windowed layers' slots through the
    map) gives the torch backend's greedy tokens."""
    from tests.conftest import save_tiny_model
    from tests.engine.test_gemma import gemma_config

    path = save_tiny_model(gemma_config("gemma2"), tmp_path / "gemma2", None)
    error = triton_interpreter.run(f"PATH = {path!r}\n" + _ENGINE)
    assert not error, error[-3000:]
