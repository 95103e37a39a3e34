"""LLaVA-NeXT, LLaVA-OneVision and Gemma 3 image requests over Ray with two tensor-parallel shard actors (the
vision tower replicated on each, the decoder split by heads): one batch of a one-image, a two-image and a text
request gives transformers' greedy tokens, as in-process (tests/vision/test_llava.py, test_gemma3_vision.py).
Qwen2-VL's tensor-parallel run is the Serve app of tests/vision/test_vision_serve.py."""

from __future__ import annotations

import pytest
import torch

import sgl_ray

from . import test_gemma3_vision as gemma3_case
from . import test_llava as llava_case
from .tiny_vl import draw

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TEXT = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_llava_over_two_shards(name, ray_cluster, llava_next_path, llava_onevision_path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = llava_next_path if name == "llava_next" else llava_onevision_path
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    family = (
        path,
        model,
        AutoImageProcessor.from_pretrained(path),
        AutoTokenizer.from_pretrained(path),
        None,
    )
    (one, _), (two, _) = llava_case.PROMPTS["one image"], llava_case.PROMPTS["two images"]
    a, b, c = draw(5), draw(6, (40, 100)), draw(8, (100, 40))
    with sgl_ray.Engine(path, tp_size=2, chunked_prefill_size=16, max_total_tokens=2048) as llm:
        outs = llm.generate([one, TEXT, two], llava_case.GREEDY, image_data=[a, None, [b, c]])
    assert [o["output_ids"] for o in outs] == [
        llava_case.hf_greedy(family, one, [a]),
        llava_case.hf_greedy(family, TEXT, []),
        llava_case.hf_greedy(family, two, [b, c]),
    ]


def test_gemma3_over_two_shards(ray_cluster, tmp_path_factory, llava_tokenizer_dir) -> None:
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
    )

    path = gemma3_case.save_tiny_gemma3(tmp_path_factory.mktemp("gemma3_vl_tp"), llava_tokenizer_dir)
    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = Gemma3Processor(
        image_processor=AutoImageProcessor.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        image_seq_length=4,
    )
    case = (path, model, processor, None)
    (one, _), (two, _) = gemma3_case.PROMPTS["one image"], gemma3_case.PROMPTS["two images"]
    a, b, c = draw(5), draw(6, (40, 100)), draw(8, (100, 40))
    with sgl_ray.Engine(path, tp_size=2, chunked_prefill_size=6, max_total_tokens=2048) as llm:
        outs = llm.generate([one, two], gemma3_case.GREEDY, image_data=[a, [b, c]])
    assert [o["output_ids"] for o in outs] == [
        gemma3_case.hf_greedy(case, one, [a]),
        gemma3_case.hf_greedy(case, two, [b, c]),
    ]
