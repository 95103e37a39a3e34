"""Qwen2-VL on CUDA (the fused rotary kernels take M-RoPE's per-token cos/sin; prefill steps of image prompts run
eagerly, their decode steps replay CUDA graphs with each request's ``mrope_delta`` as a rotary offset): greedy tokens
equal transformers' in float32 on the same card and the eager engine's, and a bf16 engine runs image and text
requests together. Token-id prompts: the GPU machine has no tokenizer to download."""

from __future__ import annotations

import pytest
import torch

import sgl_ray

from .tiny_vl import NO_TOKENIZER_IDS, draw, save_tiny_vl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

START, END, PAD, _ = NO_TOKENIZER_IDS
IMG = [START, PAD, END]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_vl(tmp_path_factory.mktemp("qwen2_vl_gpu"), None, "qwen2_vl")


def hf_greedy(model, image_processor, ids: list[int], images: list) -> list[int]:
    inputs = image_processor(images=images, return_tensors="pt")
    grids = iter(inputs["image_grid_thw"])
    expanded: list[int] = []
    for t in ids:
        expanded.extend([PAD] * int(next(grids).prod() // 4) if t == PAD else [t])
    input_ids = torch.tensor([expanded], device="cuda")
    kwargs = {k: v.to("cuda") for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(
            input_ids,
            mm_token_type_ids=(input_ids == PAD).int(),
            max_new_tokens=GREEDY["max_new_tokens"],
            do_sample=False,
            **kwargs,
        )
    return out[0, input_ids.shape[1] :].tolist()


def test_cuda_greedy_equals_transformers(path: str) -> None:
    from transformers import AutoImageProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    image_processor = AutoImageProcessor.from_pretrained(path)
    prompts = [[5, 6, *IMG, 7, 8, 9], [10, *IMG, 11, *IMG, 12]]
    images = [[draw(1)], [draw(2, (112, 56)), draw(3)]]
    with sgl_ray.Engine(path, device="cuda", dtype="float32", skip_tokenizer_init=True, page_size=1) as llm:
        outs = llm.generate(input_ids=prompts, sampling_params=GREEDY, image_data=images)
    for out, ids, ims in zip(outs, prompts, images, strict=True):
        assert out["output_ids"] == hf_greedy(model, image_processor, ids, ims)


def test_cuda_bf16_mixed_batch_runs(path: str) -> None:
    with sgl_ray.Engine(path, device="cuda", dtype="bfloat16", skip_tokenizer_init=True) as llm:
        outs = llm.generate(
            input_ids=[[5, *IMG, 6], [7, 8, 9], [5, *IMG, 6]],
            sampling_params=GREEDY,
            image_data=[draw(4), None, draw(4)],
        )
    assert all(len(o["output_ids"]) == GREEDY["max_new_tokens"] for o in outs)
    assert outs[0]["output_ids"] == outs[2]["output_ids"]


def test_cuda_graphs_replay_image_decode_steps(path: str) -> None:
    """Every request has an image: before rotary offsets no step of theirs replayed a graph."""
    prompts = [[5, 6, *IMG, 7, 8, 9], [10, *IMG, 11, *IMG, 12], [13, *IMG]]
    images = [[draw(1)], [draw(2, (112, 56)), draw(3)], [draw(5, (56, 112))]]
    got: dict[bool, list[list[int]]] = {}
    for disable in (True, False):
        with sgl_ray.Engine(
            path,
            device="cuda",
            dtype="float32",
            skip_tokenizer_init=True,
            page_size=1,
            disable_cuda_graph=disable,
        ) as llm:
            graphs = llm._core.runner.cuda_graphs
            assert (graphs is None) == disable
            before = 0 if graphs is None else graphs.num_replays
            outs = llm.generate(input_ids=prompts, sampling_params=GREEDY, image_data=images)
            got[disable] = [o["output_ids"] for o in outs]
            if graphs is not None:
                assert graphs.rope_offset  # the captured steps read the offsets' row
                assert graphs.num_replays - before >= GREEDY["max_new_tokens"] - 2
    assert got[False] == got[True]
    assert all(len(ids) == GREEDY["max_new_tokens"] for ids in got[False])
