"""The Triton attention backend on layers with a sliding window, attention sinks (GPT-OSS) or soft-capped scores
(Gemma 2) against a dense softmax (``test_triton_attention.dense_reference``): ragged decode with forced splits,
extends over cached prefixes, and decode-graph metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .test_triton_attention import check, make_batch, make_case, nan_buffers, ragged_lens, split_qkv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# 1 (only itself), shorter than most sequences, about their length, longer than all
WINDOWS = [None, 1, 100, 1000, 100_000]
SINKS = [pytest.param(False, id="no-sinks"), pytest.param(True, id="sinks")]


@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"window-{w}")
@pytest.mark.parametrize("num_kv_splits", [None, 1, 8])
def test_decode_window_and_sinks(num_kv_splits, window, sinks):
    """Ragged decode of a GPT-OSS-shaped layer (64 query heads over 8, head_dim 64); one split puts the sinks in
    stage 1, more in the merge."""
    if window is None and not sinks:
        pytest.skip("the plain layer: test_triton_attention.py")
    seq = ragged_lens(24, 1, 3000, seed=14)
    case = make_case(
        seq - 1, np.ones_like(seq), 64, 8, 64, torch.bfloat16, seed=15, sliding_window=window, sinks=sinks
    )
    check(case, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"window-{w}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_extend_window_and_sinks(dtype, window, sinks):
    """Extends over cached prefixes (windows starting inside the prefix and inside the new tokens) with decode
    rows between them."""
    if window is None and not sinks:
        pytest.skip("the plain layer: test_triton_attention.py")
    ext = np.array([700, 2, 65, 1, 377, 129, 1])
    prefix = np.array([900, 0, 7, 40, 640, 1, 0])
    check(make_case(prefix, ext, 16, 4, 64, dtype, seed=16, sliding_window=window, sinks=sinks))


@pytest.mark.parametrize("lens", [[1000], [31, 512]], ids=str)
def test_window_and_sinks_from_graph_metadata(lens):
    """A layer with a window and sinks run on the metadata of decode graphs (the short-sequence one, whose 32-key
    splits prefetch, and the full-length one): the window and sinks need nothing per step but the layer."""
    from sgl_ray.attention.triton_backend import TritonAttentionBackend

    seq = np.array(lens)
    for max_len in (1024 // len(seq), 8192):

        def run(case, max_len=max_len):
            backend = nan_buffers(TritonAttentionBackend(case.qkv.device))
            batch = make_batch(case, case.pool, backend)
            batch.extend_start_loc = torch.arange(len(seq), device=case.qkv.device)
            batch.attn_metadata = backend.graph_metadata(batch, max_len)
            return backend.forward(*split_qkv(case), case.layer, batch)

        case = make_case(
            seq - 1, np.ones_like(seq), 32, 8, 128, torch.bfloat16, seed=17, sliding_window=128, sinks=True
        )
        check(case, run=run)


@pytest.mark.parametrize("window", [None, 100], ids=lambda w: f"window-{w}")
def test_soft_capped_scores(window):
    """Gemma 2's soft-capped scores (cap 2, which bends most of these scores) at Gemma's head_dim 256: ragged
    decode with forced splits, then extends over cached prefixes with decode rows between them."""
    seq = ragged_lens(24, 1, 3000, seed=18)
    kwargs = dict(sliding_window=window, logit_cap=2.0)
    check(
        make_case(seq - 1, np.ones_like(seq), 16, 8, 256, torch.bfloat16, seed=18, **kwargs), num_kv_splits=8
    )
    ext, prefix = np.array([700, 2, 65, 1, 129]), np.array([900, 0, 7, 40, 1])
    check(make_case(prefix, ext, 16, 8, 256, torch.bfloat16, seed=19, **kwargs))
