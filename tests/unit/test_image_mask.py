"""The attention mask of images whose tokens see each other in both directions (Gemma 3): every token of an image
sees the whole image, later tokens of it in the step too, and everything else is causal; a sliding window still
bounds what a token sees behind it. The Triton extend kernel (in Triton's CPU interpreter here, natively with
``-m gpu``) and the torch backend against attention written out with transformers' mask,
``AND(window, OR(causal, same image))``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Checked by every backend: a mixed batch over a shuffled, NaN-poisoned pool (tests/gpu/test_triton_attention.py).
_CHECK = """
import numpy as np, torch
from sgl_ray.multimodal.runner import MultimodalBatch
from sgl_ray.runner.forward_batch import ForwardBatch
from tests.gpu.test_triton_attention import LAYER_ID, make_case, nan_buffers, split_qkv

# (cached prefix, new tokens, image spans [start, end) by position) of each request of the step
REQUESTS = [
    (0, 150, [(10, 30), (40, 110)]),  # a prompt with two images, the second across the kernel's 64-query blocks
    (37, 30, [(30, 60)]),  # a prefix-cache hit inside an image: the rest of the image, then text
    (20, 1, None),  # a decode row
    (5, 9, None),  # a text chunk
    (64, 72, [(64, 100), (101, 136)]),  # a chunk that starts at an image and ends at the next one's end
    (3, 20, [(4, 12)]),
]


def image_batch(case, backend):
    prefix, ext = case.prefix_lens, case.extend_lens
    dev = case.qkv.device
    starts = np.cumsum(ext) - ext
    spans = tuple(None if s is None else np.array(s) for _, _, s in REQUESTS)
    batch = ForwardBatch(
        input_ids=torch.zeros(int(ext.sum()), dtype=torch.int64, device=dev),
        positions=torch.from_numpy(np.repeat(prefix - starts, ext) + np.arange(int(ext.sum()))).to(dev),
        out_cache_loc=case.out_cache_loc, req_pool_idxs=case.req_pool_idxs,
        seq_lens=torch.from_numpy(prefix + ext).to(dev), extend_start_loc=torch.from_numpy(starts).to(dev),
        logits_indices=torch.from_numpy(starts + ext - 1).to(dev), prefix_lens_cpu=prefix, extend_lens_cpu=ext,
        kv_pool=case.pool, req_to_token=case.req_to_token, attn_backend=backend,
    )
    batch.multimodal = MultimodalBatch(None, None, None, image_spans=spans)
    backend.init_forward_metadata(batch)
    return batch


def image_reference(case, causal=False):
    # [T, H * D] fp64 softmax per request: key j visible to query i iff (j <= i or both in one image) and, with
    # a window, j > i - window (transformers' Gemma 3 masks: group ids of image tokens, -1 for text)
    layer = case.layer
    h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q_all, k_all, v_all = (t.double() for t in split_qkv(case))
    k_pool, v_pool = case.pool.k_buffers[LAYER_ID].double(), case.pool.v_buffers[LAYER_ID].double()
    outs, row = [], 0
    for slots, (prefix, n, spans) in zip(case.slots, REQUESTS):
        new = slice(row, row + n)
        k = torch.cat([k_pool[slots[:prefix]], k_all[new].reshape(n, kvh, d)]).transpose(0, 1)  # [KVH, S, D]
        v = torch.cat([v_pool[slots[:prefix]], v_all[new].reshape(n, kvh, d)]).transpose(0, 1)
        k, v = k.repeat_interleave(h // kvh, dim=0), v.repeat_interleave(h // kvh, dim=0)  # [H, S, D]
        q = q_all[new].reshape(n, h, d).transpose(0, 1)  # [H, n, D]
        group = torch.full((prefix + n,), -1, device=q.device)
        for g, (start, end) in enumerate([] if spans is None or causal else spans):
            group[start:end] = g
        i = torch.arange(prefix, prefix + n, device=q.device)[:, None]
        j = torch.arange(prefix + n, device=q.device)[None, :]
        visible = (j <= i) | ((group[i] == group[j]) & (group[i] >= 0))
        if layer.sliding_window is not None:
            visible &= j > i - layer.sliding_window
        scores = (q @ k.transpose(1, 2) * layer.scaling).masked_fill(~visible, float("-inf"))
        outs.append((scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(n, h * d))
        row += n
    return torch.cat(outs).float()


def check_image_mask(backend, device, dtype, window, atol):
    prefix = np.array([p for p, _, _ in REQUESTS])
    ext = np.array([n for _, n, _ in REQUESTS])
    case = make_case(prefix, ext, 4, 2, 32, dtype, device=device, seed=7, sliding_window=window)
    want = image_reference(case)  # before the backend writes the new keys into the pool
    assert (want - image_reference(case, causal=True)).abs().max() > 0.05  # the images matter
    out = nan_buffers(backend).forward(*split_qkv(case), case.layer, image_batch(case, backend)).float()
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, atol=atol, rtol=atol)
"""


def _check_scope() -> dict:
    scope: dict = {}
    exec(compile(_CHECK, "<image mask check>", "exec"), scope)
    return scope


@pytest.mark.parametrize("window", [None, 8])
def test_image_mask_torch_backend(window: int | None) -> None:
    from sgl_ray.attention.torch_backend import TorchAttentionBackend

    backend = TorchAttentionBackend(torch.device("cpu"))
    _check_scope()["check_image_mask"](backend, "cpu", torch.float32, window, 1e-4)


def test_image_mask_triton_kernel_in_the_interpreter(triton_interpreter) -> None:
    """fp32 and fp16 (the kernel's two key-block widths), without and with a window shorter than the images."""
    script = (
        _CHECK
        + "\nfrom sgl_ray.attention.triton_backend import TritonAttentionBackend\n"
        + "for dtype, window, atol in ((torch.float32, None, 1e-4), (torch.float32, 8, 1e-4), (torch.float16, 8, 5e-3)):\n"
        + "    check_image_mask(TritonAttentionBackend('cpu'), 'cpu', dtype, window, atol)\n"
    )
    error = triton_interpreter.run(script)
    assert not error, error[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 8])
def test_image_mask_triton_kernel_on_cuda(dtype: torch.dtype, window: int | None) -> None:
    from sgl_ray.attention.triton_backend import TritonAttentionBackend

    atol = {torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    _check_scope()["check_image_mask"](
        TritonAttentionBackend(torch.device("cuda")), "cuda", dtype, window, atol
    )


def test_image_ends_of_a_step() -> None:
    """The Triton backend's per-token array: each image token's end among its request's new tokens, 0 for text
    and for steps or requests without images."""
    from types import SimpleNamespace

    from sgl_ray.attention.triton_backend import _image_ends

    ext, prefix = np.array([1, 8, 5]), np.array([9, 4, 0])
    starts = np.cumsum(ext) - ext
    spans = (
        None,
        np.array([[2, 7], [8, 12]]),
        None,
    )  # positions 4..11: image 2..7 (begun in the prefix), 8..11
    batch = SimpleNamespace(multimodal=SimpleNamespace(image_spans=spans), extend_lens_cpu=ext)
    got = _image_ends(batch, np.array([1, 2]), starts, prefix)
    assert got.tolist() == [0, 3, 3, 0, 0, 8, 8, 8, 0, 0, 0, 0, 0, 0]
    assert _image_ends(SimpleNamespace(multimodal=None), np.array([1, 2]), starts, prefix) is None
    batch.multimodal = SimpleNamespace(image_spans=(None, None, None))
    assert _image_ends(batch, np.array([1, 2]), starts, prefix) is None
