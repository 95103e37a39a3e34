"""Sliding-window attention, attention sinks (GPT-OSS) and soft-capped scores (Gemma 2) in the torch backend,
against the dense softmax of ``tests/gpu/test_triton_attention.py::dense_reference`` (mask built explicitly, sinks
concatenated as in transformers), on the same shuffled, NaN-poisoned pools as the GPU tests. Also: the layer's sink parameter and its
tensor-parallel loader, and the FlashInfer backend's refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgl_ray.attention import torch_backend
from sgl_ray.attention.torch_backend import TorchAttentionBackend
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.layers.attention import RadixAttention

from ..gpu.test_triton_attention import check, dense_reference, make_batch, make_case, split_qkv


def run_torch(case):
    backend = TorchAttentionBackend(case.qkv.device)
    return backend.forward(*split_qkv(case), case.layer, make_batch(case, case.pool, backend))


def cpu_case(prefix, ext, window, sinks, heads=(8, 2), dtype=torch.float32, seed=0, logit_cap=None):
    return make_case(
        np.array(prefix), np.array(ext), *heads, 16, dtype, device="cpu", seed=seed,
        sliding_window=window, sinks=sinks, logit_cap=logit_cap,
    )  # fmt: skip


DECODE = (np.array([0, 4, 39, 99, 15]), np.ones(5, dtype=np.int64))  # ragged: 1 .. 100 keys
EXTEND = (np.array([0, 0, 30, 7]), np.array([40, 1, 25, 9]))  # a prefill, a 1-token prompt, cached prefixes
MIXED = (np.array([50, 0, 12, 3, 80]), np.array([1, 33, 1, 20, 1]))  # decode and extend rows interleaved
BATCHES = {"decode": DECODE, "extend": EXTEND, "mixed": MIXED}
# 1 (only itself), smaller than most sequences, equal to one (the 40-token prompt), larger than every one
WINDOWS = [None, 1, 16, 40, 1000]


@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"window-{w}")
@pytest.mark.parametrize("batch", list(BATCHES))
def test_torch_backend_matches_dense_softmax(batch, window, sinks):
    case = cpu_case(*BATCHES[batch], window, sinks, seed=len(batch))
    if window is None and not sinks:  # the plain path (SDPA), which the GPU tests use as their reference
        torch.testing.assert_close(run_torch(case), dense_reference(case), atol=1e-5, rtol=1e-5)
    else:
        check(case, run=run_torch)


@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("window", [None, 16], ids=lambda w: f"window-{w}")
@pytest.mark.parametrize("batch", list(BATCHES))
def test_soft_capped_scores(batch, window, sinks):
    """Scores capped at 1 (the scaled scores of these inputs are about N(0, 1), so the cap bends most of them):
    the dense softmax's output, which the cap changes."""
    case = cpu_case(*BATCHES[batch], window, sinks, seed=7, logit_cap=1.0)
    check(case, run=run_torch)
    uncapped = cpu_case(*BATCHES[batch], window, sinks, seed=7)
    assert (run_torch(case) - run_torch(uncapped)).abs().amax() > 0.05


@pytest.mark.parametrize("heads", [(4, 4), (8, 1)], ids=["mha", "mqa"])
def test_head_groupings(heads):
    check(cpu_case(*MIXED, 16, True, heads=heads, seed=3), run=run_torch)


def test_bf16_with_sinks_and_window():
    check(cpu_case(*MIXED, 16, True, dtype=torch.bfloat16, seed=4), run=run_torch)


def test_long_extend_in_chunks(monkeypatch):
    """Prompts cut into several query chunks (a small score budget): same output, keys before a chunk's window
    not gathered."""
    monkeypatch.setattr(torch_backend, "SCORE_BUDGET", 8 * 40 * 7)
    for window in (None, 5, 12):
        case = cpu_case([20, 0], [50, 37], window, True, seed=5)
        check(case, run=run_torch)
        backend = TorchAttentionBackend("cpu")
        meta = make_batch(case, case.pool, backend).attn_metadata.variant(window, 8)
        assert len(meta.extends) > 2
        for part in meta.extends:
            assert part.num_tokens * len(part.kv_slots) * 8 <= torch_backend.SCORE_BUDGET
            if window is not None:
                assert len(part.kv_slots) < part.num_tokens + window


def test_window_reaching_past_the_sequence_is_full_attention():
    """A window at least as long as every sequence, without sinks, is plain causal attention (the fast path)."""
    full = cpu_case(*MIXED, None, False, seed=6)
    windowed = cpu_case(*MIXED, 1000, False, seed=6)
    torch.testing.assert_close(run_torch(windowed), run_torch(full), atol=1e-5, rtol=1e-5)


def test_window_of_one_sees_only_itself():
    """With window 1 a token's output is its own value row, scaled by its share against the sink."""
    case = cpu_case(*MIXED, 1, True, seed=7)
    q, k, v = (t.reshape(t.shape[0], -1, 16) for t in split_qkv(case))
    group = 8 // 2
    score = (q * k.repeat_interleave(group, dim=1)).sum(-1) * case.layer.scaling  # [T, H]
    share = torch.sigmoid(score - case.layer.sinks)  # e^s / (e^s + e^sink)
    expected = share[..., None] * v.repeat_interleave(group, dim=1)
    torch.testing.assert_close(run_torch(case), expected.reshape(len(q), -1), atol=1e-5, rtol=1e-5)


def test_sinks_lower_the_output():
    """A sink only adds to the denominator: every output is the no-sink output times the same per-row factor."""
    with_sinks = dense_reference(cpu_case(*DECODE, None, True, seed=8))
    without = dense_reference(cpu_case(*DECODE, None, False, seed=8))
    ratio = (with_sinks / without).view(5, 8, 16)
    assert ((ratio > 0) & (ratio < 1)).all()
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), atol=1e-5, rtol=1e-5)


def test_plain_layers_build_no_variant():
    case = cpu_case(*MIXED, None, False, seed=9)
    backend = TorchAttentionBackend("cpu")
    batch = make_batch(case, case.pool, backend)
    backend.forward(*split_qkv(case), case.layer, batch)
    assert batch.attn_metadata.variants == {}


@pytest.mark.parametrize("window", [None, 1, 7, 64])
def test_dense_reference_is_transformers_gpt_oss_attention(window):
    """The reference's mask and sinks are transformers' own: GPT-OSS's eager attention with the mask of
    ``sliding_window_causal_mask_function`` (queries at positions 20 .. 50 over a cached prefix of 20)."""
    from types import SimpleNamespace

    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    case = cpu_case([20], [30], window, True, seed=10)
    h, kvh, d = 8, 2, 16
    q, k_new, v_new = split_qkv(case)
    slots = case.slots[0]
    k = torch.cat([case.pool.k_buffers[1][slots[:20]], k_new.reshape(30, kvh, d)])  # [50, KVH, D]
    v = torch.cat([case.pool.v_buffers[1][slots[:20]], v_new.reshape(30, kvh, d)])
    mask_fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    visible = mask_fn(0, 0, torch.arange(20, 50)[:, None], torch.arange(50)[None, :])  # [n, S]
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = SimpleNamespace(sinks=case.layer.sinks.detach(), num_key_value_groups=h // kvh, training=False)
    want, _ = eager_attention_forward(
        module,
        q.reshape(1, 30, h, d).transpose(1, 2),
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        additive[None, None],
        case.layer.scaling,
    )  # [1, n, H, D]
    want = want.reshape(30, h * d)
    torch.testing.assert_close(dense_reference(case), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_torch(case), want, atol=1e-5, rtol=1e-5)


# --- the layer ---------------------------------------------------------------------------------------------------


def test_sinks_parameter_and_tp_loader():
    full = torch.arange(16, dtype=torch.float32)
    for rank in range(4):
        layer = RadixAttention(4, 8, 0.1, 1, 0, sliding_window=128, sinks=True, tp_rank=rank)
        assert isinstance(layer.sinks, torch.nn.Parameter) and layer.sinks.shape == (4,)
        layer.sinks.weight_loader(layer.sinks, full)
        torch.testing.assert_close(layer.sinks.data, full[4 * rank : 4 * rank + 4])
        assert dict(layer.named_parameters()).keys() == {"sinks"}
    with pytest.raises(ValueError, match="sinks"):
        layer.sinks.weight_loader(layer.sinks, full[:12])  # rank 3 needs heads 12..16


def test_layer_defaults():
    layer = RadixAttention(4, 8, 0.1, 1, 0)
    assert layer.sinks is None and layer.sliding_window is None and layer.logit_cap is None
    assert list(layer.parameters()) == []
    with pytest.raises(ValueError, match="sliding_window"):
        RadixAttention(4, 8, 0.1, 1, 0, sliding_window=0)
    with pytest.raises(ValueError, match="logit_cap"):
        RadixAttention(4, 8, 0.1, 1, 0, logit_cap=0.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sliding_window=128), "sliding window of 128"),
        (dict(sinks=True), "sinks"),
        (dict(logit_cap=50.0), "soft-capped"),
    ],
)
def test_flashinfer_refuses_windows_and_sinks(kwargs, match):
    from sgl_ray.attention.flashinfer_backend import check_layer_supported

    check_layer_supported(RadixAttention(4, 8, 0.1, 1, 0))
    with pytest.raises(UnsupportedModelError, match=f"{match}.*triton"):
        check_layer_supported(RadixAttention(4, 8, 0.1, 1, 3, **kwargs))
