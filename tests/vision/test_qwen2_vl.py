"""Qwen2-VL image inputs end to end: greedy tokens equal transformers' on the same random weights, the image
prefix cache, chunked prefill through an image, and bad images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sgl_ray
from sgl_ray.multimodal import InvalidImageError

from .tiny_vl import IMAGE, draw

MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(qwen2_vl_path: str):
    """transformers' Qwen2VLForConditionalGeneration, its image processor and the tokenizer, on the same files."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_path, dtype=torch.float32).eval()
    return (
        model,
        AutoImageProcessor.from_pretrained(qwen2_vl_path),
        AutoTokenizer.from_pretrained(qwen2_vl_path),
    )


def hf_greedy(reference, prompt: str, images: list) -> list[int]:
    """transformers' greedy tokens; the placeholder expansion is Qwen2VLProcessor's rule (grid / merge**2)."""
    model, image_processor, tokenizer = reference
    ids = tokenizer.encode(prompt)
    pad = model.config.image_token_id
    inputs = image_processor(images=images, return_tensors="pt") if images else {}
    grids = inputs.get("image_grid_thw", [])
    expanded: list[int] = []
    grid_iter = iter(grids)
    for t in ids:
        expanded.extend([pad] * int(next(grid_iter).prod() // 4) if t == pad else [t])
    input_ids = torch.tensor([expanded])
    kwargs = dict(inputs, mm_token_type_ids=(input_ids == pad).int()) if images else {}
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
    return out[0, input_ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def engine(qwen2_vl_path: str):
    with sgl_ray.Engine(qwen2_vl_path, chunked_prefill_size=16, page_size=1) as llm:
        yield llm


PROMPTS = {
    "one image": (
        f"<|im_start|>user\n{IMAGE}What is in the picture?<|im_end|>\n<|im_start|>assistant\n",
        [1],
    ),
    "two images": (f"Compare {IMAGE} and {IMAGE} please.", [2, 3]),
    "image between turns": (
        f"<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n"
        f"<|im_start|>user\nLook: {IMAGE}<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n",
        [4],
    ),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_greedy_equals_transformers(engine, reference, case: str) -> None:
    prompt, kinds = PROMPTS[case]
    images = [draw(k, (84 + 28 * i, 56)) for i, k in enumerate(kinds)]
    want = hf_greedy(reference, prompt, images)
    out = engine.generate(prompt, GREEDY, image_data=images)
    assert out["output_ids"] == want
    # the reference depends on the image: another picture gives other tokens
    assert (
        hf_greedy(reference, prompt, [draw(k + 7, im.size) for k, im in zip(kinds, images, strict=True)])
        != want
    )


def test_batch_mixes_image_and_text_requests(engine, reference) -> None:
    """Several requests in one batch: images in some, none in one (its rows take plain positions)."""
    (p1, _), (p2, _) = PROMPTS["one image"], PROMPTS["two images"]
    text = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    a, b, c = draw(5), draw(6, (56, 84)), draw(8, (112, 56))
    outs = engine.generate([p1, text, p2], GREEDY, image_data=[a, None, [b, c]])
    assert [o["output_ids"] for o in outs] == [
        hf_greedy(reference, p1, [a]),
        hf_greedy(reference, text, []),
        hf_greedy(reference, p2, [b, c]),
    ]


def test_prefix_cache_keys_images_by_content(qwen2_vl_path: str) -> None:
    """The same image and prompt hit the radix cache through the image; a changed image misses from it on."""
    prompt = f"<|im_start|>user\nDescribe {IMAGE} in detail<|im_end|>\n<|im_start|>assistant\n"
    with sgl_ray.Engine(qwen2_vl_path, page_size=1) as llm:
        ids, mm = llm.image_processor.process(llm.tokenizer.encode(prompt), [draw(1)])
        image_end = mm.images[0].offset + mm.images[0].num_tokens
        first = llm.generate(prompt, GREEDY, image_data=draw(1))
        again = llm.generate(prompt, GREEDY, image_data=draw(1))
        other = llm.generate(prompt, GREEDY, image_data=draw(2))
    assert first["meta_info"]["cached_tokens"] == 0
    assert again["meta_info"]["cached_tokens"] >= image_end  # through the image (to the last prompt token)
    assert again["output_ids"] == first["output_ids"]
    assert other["meta_info"]["cached_tokens"] == mm.images[0].offset  # the text before the image only
    assert other["output_ids"] != first["output_ids"]


def test_chunked_prefill_splits_an_image(qwen2_vl_path: str, reference) -> None:
    """Chunks of 4 tokens: every image (8 and 6 tokens here) is split across prefill steps, and one chunk holds
    the end of one image and the start of text or the next image."""
    prompt = f"A{IMAGE}{IMAGE}B"
    images = [draw(3, (112, 56)), draw(4)]
    with sgl_ray.Engine(qwen2_vl_path, chunked_prefill_size=4, page_size=1) as llm:
        _, mm = llm.image_processor.process(llm.tokenizer.encode(prompt), images)
        assert all(im.offset // 4 != (im.offset + im.num_tokens - 1) // 4 for im in mm.images)
        out = llm.generate(prompt, GREEDY, image_data=images)
    assert out["output_ids"] == hf_greedy(reference, prompt, images)


def test_image_formats_agree(engine, tmp_path) -> None:
    """A path, PNG bytes and a data: URL give what the PIL image gives."""
    import base64
    import io

    prompt = PROMPTS["one image"][0]
    image = draw(9)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()
    (tmp_path / "image.png").write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    outs = [
        engine.generate(prompt, GREEDY, image_data=x)["output_ids"]
        for x in (image, png, str(tmp_path / "image.png"), url)
    ]
    assert outs[1:] == outs[:1] * 3


@pytest.mark.parametrize(
    ("image_data", "message"),
    [
        (b"not an image at all", "image_data[0]: cannot decode the image"),
        ("data:image/png;base64,***", "image_data[0]: the data: URL is not valid base64"),
        ("data:image/png,plain", "image_data[0]: a data: URL must be base64"),
        ("/no/such/file.png", "image_data[0]: cannot read"),
        (12345, "image_data[0]: an image must be"),
        ([draw(1), draw(2)], "the prompt has 1 image placeholders for 2 images"),
        ([draw(1)] * 17, "image_data: 17 images, over the limit of 16"),
    ],
)
def test_bad_images_raise_a_typed_error(engine, image_data, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        engine.generate(PROMPTS["one image"][0], GREEDY, image_data=image_data)
    assert err.value.status_code == 400 and err.value.param.startswith("image_data")


def test_image_limits(qwen2_vl_path: str) -> None:
    from sgl_ray.multimodal import ImageLimits
    from sgl_ray.multimodal.inputs import load_image

    big = draw(1, (300, 300))
    with pytest.raises(InvalidImageError, match="over the limit|pixels"):
        load_image(big, ImageLimits(max_image_pixels=100 * 100), "image_data[0]")
    with pytest.raises(InvalidImageError, match="allowed media path"):
        load_image("/etc/hostname", ImageLimits(allowed_local_media_path=str(qwen2_vl_path)), "image_data[0]")


def test_prompt_logprobs_and_penalties_see_the_placeholder(engine) -> None:
    """The radix key's image ids never reach the model's vocabulary: prompt logprobs name the placeholder token,
    and a repetition penalty runs over the prompt."""
    prompt = PROMPTS["one image"][0]
    params = {**GREEDY, "repetition_penalty": 1.3}
    out = engine.generate(prompt, params, image_data=draw(1), return_logprob=True, logprob_start_len=0)
    targets = [t for _, t, *_ in out["meta_info"]["input_token_logprobs"]]
    pad = engine.image_processor.image_token_id
    assert len(targets) == out["meta_info"]["prompt_tokens"] and targets.count(pad) == 6
    assert len(out["output_ids"]) == MAX_NEW


def hub_layout_of(directory: Path, out: Path) -> str:
    """The checkpoint in ``directory`` as older hub configs hold it (the text fields at the top, M-RoPE as
    ``rope_scaling: {"type": "mrope"}``) with transformers 5's in-memory weight names (``model.language_model.*``,
    ``model.visual.*``)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    config = json.loads((directory / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {k: v for k, v in text.items() if k not in ("model_type", "layer_types")}
    flat.update(config, rope_theta=rope["rope_theta"])
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = flat["vision_config"]
    vision["in_chans"] = vision.pop("in_channels")
    del vision["rope_parameters"]
    (out / "config.json").write_text(json.dumps(flat))
    weights = load_file(directory / "model.safetensors")
    renamed = {
        ("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)): v
        for k, v in weights.items()
    }
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    for f in directory.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    return str(out)


def test_older_config_and_weight_names_load(qwen2_vl_path: str, reference, tmp_path: Path) -> None:
    path = hub_layout_of(Path(qwen2_vl_path), tmp_path)
    prompt, kinds = PROMPTS["one image"]
    images = [draw(k) for k in kinds]
    with sgl_ray.Engine(path, page_size=1) as llm:
        out = llm.generate(prompt, GREEDY, image_data=images)
    assert out["output_ids"] == hf_greedy(reference, prompt, images)


@pytest.mark.parametrize(
    ("option", "message"),
    [({"speculative_algorithm": "NGRAM"}, "speculative decoding"), ({"pp_size": 2}, "pipeline stage")],
)
def test_unsupported_engine_options_are_refused(qwen2_vl_path: str, option: dict, message: str) -> None:
    from sgl_ray.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=message):
        sgl_ray.Engine(qwen2_vl_path, **option)


def test_async_generate_with_images(engine) -> None:
    import asyncio

    prompt, image = PROMPTS["one image"][0], draw(5)
    got = asyncio.run(engine.async_generate(prompt, GREEDY, image_data=image))
    assert got["output_ids"] == engine.generate(prompt, GREEDY, image_data=image)["output_ids"]
    with pytest.raises(InvalidImageError, match="cannot decode"):
        asyncio.run(engine.async_generate(prompt, GREEDY, image_data=b"junk"))


def test_decode_steps_take_rotary_offsets_not_mrope_positions(engine, reference, monkeypatch) -> None:
    """Prefill chunks (inside the prompt) take the [3, T] M-RoPE positions; every decode step of the image request
    takes no MultimodalBatch, only its ``mrope_delta`` as a rotary offset, and the tokens still equal
    transformers'. Without the offset they would not: the test sees the decode steps' rotary."""
    prompt, image = PROMPTS["one image"][0], draw(11)
    _, mm_inputs = engine.image_processor.process(engine.tokenizer.encode(prompt), [image])
    prompt_len, delta = mm_inputs.mrope_positions.shape[1], mm_inputs.mrope_delta
    assert delta != 0
    state = engine._core.runner.multimodal
    steps: list[tuple[np.ndarray, np.ndarray, object]] = []
    offsets: list[tuple[np.ndarray, np.ndarray | None]] = []
    step, rope_offsets = state.step, state.rope_offsets

    def recorded_step(plan):
        steps.append((plan.prefix_lens.copy(), plan.extend_lens.copy(), out := step(plan)))
        return out

    def recorded_offsets(plan):
        offsets.append((plan.prefix_lens.copy(), out := rope_offsets(plan)))
        return out

    monkeypatch.setattr(state, "step", recorded_step)
    monkeypatch.setattr(state, "rope_offsets", recorded_offsets)
    want = hf_greedy(reference, prompt, [image])
    assert engine.generate(prompt, GREEDY, image_data=image)["output_ids"] == want
    assert steps and all((prefix + ext <= prompt_len).all() for prefix, ext, _ in steps)
    assert all(batch.mrope_positions.shape == (3, int(ext.sum())) for _, ext, batch in steps)
    last_prefix, last_ext, _ = steps[-1]
    assert last_prefix.tolist() == [prompt_len - int(last_ext.sum())]  # chunks up to the prompt's last row
    assert all(int(ext.sum()) > 1 for _, ext, _ in steps)  # prefill chunks only
    decode = [out for prefix, out in offsets if (prefix >= prompt_len).all()]
    assert len(decode) == MAX_NEW - 1 and all(out is not None and out.tolist() == [delta] for out in decode)
    monkeypatch.setattr(state, "rope_offsets", lambda plan: None)  # decode at the plain positions: wrong
    assert engine.generate(prompt, GREEDY, image_data=image)["output_ids"] != want
