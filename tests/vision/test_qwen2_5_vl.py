"""Qwen2.5-VL (window attention, RMSNorms and a gated MLP in the tower): greedy tokens equal transformers'."""

from __future__ import annotations

import pytest
import torch

import sgl_ray

from .test_qwen2_vl import GREEDY, hf_greedy
from .tiny_vl import IMAGE, draw


@pytest.fixture(scope="module")
def reference25(qwen2_5_vl_path: str):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen2_5_vl_path, dtype=torch.float32).eval()
    return (
        model,
        AutoImageProcessor.from_pretrained(qwen2_5_vl_path),
        AutoTokenizer.from_pretrained(qwen2_5_vl_path),
    )


def test_greedy_equals_transformers(qwen2_5_vl_path: str, reference25) -> None:
    one = f"<|im_start|>user\n{IMAGE}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
    two = f"Compare {IMAGE} and {IMAGE} please."
    # 8 x 8 patches (4 windows of 2 x 2 merge units); 6 x 8 and 4 x 6 (windows cut short at the edges)
    cases = [(one, [draw(1, (112, 112))]), (two, [draw(2, (112, 84)), draw(3, (84, 56))])]
    with sgl_ray.Engine(qwen2_5_vl_path, chunked_prefill_size=8, page_size=1) as llm:
        outs = llm.generate([p for p, _ in cases], GREEDY, image_data=[images for _, images in cases])
    for out, (prompt, images) in zip(outs, cases, strict=True):
        want = hf_greedy(reference25, prompt, images)
        assert out["output_ids"] == want
        assert hf_greedy(reference25, prompt, [draw(9, im.size) for im in images]) != want
