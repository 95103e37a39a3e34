"""LLaVA-NeXT (CLIP on Llama) and LLaVA-OneVision (SigLIP on Qwen2) image inputs end to end: greedy tokens equal
transformers' on the same random weights, the anyres token counts equal the HF processor's rule, the image
embedding and prefix caches, and both checkpoint layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import sgl_ray

from .tiny_vl import draw

MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
FAMILIES = ["llava_next", "llava_onevision"]

PROMPTS = {
    "one image": (
        "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n",
        [1],
    ),
    # OneVision gives each image of a prompt of several as its base crop alone (no anyres grid)
    "two images": ("Compare <image> and <image> please.", [2, 3]),
    "image between turns": (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n"
        "<|im_start|>user\nLook: <image><|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n",
        [4],
    ),
}
# sizes that pick each pinpoint (2x2 crops, 2x1, 1x2) and letterbox rows or columns; OneVision scales the
# 2x2 grids down (anyres_max_2) and keeps the others
SIZES = [(84, 56), (40, 100), (100, 40)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, llava_next_path: str, llava_onevision_path: str):
    """(path, transformers model, its image processor, tokenizer, engine) of one family."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = llava_next_path if request.param == "llava_next" else llava_onevision_path
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with sgl_ray.Engine(path, chunked_prefill_size=16, page_size=1) as llm:
        yield path, model, AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path), llm


def is_onevision(model) -> bool:
    return type(model).__name__ == "LlavaOnevisionForConditionalGeneration"


def hf_inputs(family, prompt: str, images: list) -> tuple[torch.Tensor, dict]:
    """transformers' input ids and image kwargs; each placeholder expanded to the number of features transformers'
    model gives its image."""
    _, model, image_processor, tokenizer, _ = family
    ids = tokenizer.encode(prompt)
    if not images:
        return torch.tensor([ids]), {}
    onevision = is_onevision(model)
    pixels = image_processor(images=[images] if onevision else images, return_tensors="pt")
    kwargs = {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}
    if onevision:
        kwargs["batch_num_images"] = torch.tensor([len(images)])
    with torch.no_grad():
        features = model.model.get_image_features(**kwargs).pooler_output
    counts = iter(f.shape[0] for f in features)
    pad = model.config.image_token_id
    expanded = [x for t in ids for x in ([pad] * next(counts) if t == pad else [t])]
    return torch.tensor([expanded]), kwargs


def hf_greedy(family, prompt: str, images: list) -> list[int]:
    input_ids, kwargs = hf_inputs(family, prompt, images)
    with torch.no_grad():
        out = family[1].generate(input_ids, max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
    return out[0, input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("case", list(PROMPTS))
def test_greedy_equals_transformers(family, case: str) -> None:
    """Every image here spans more than one 16-token prefill chunk, so chunks start and end inside images."""
    llm = family[-1]
    prompt, kinds = PROMPTS[case]
    images = [draw(k, SIZES[i % len(SIZES)]) for i, k in enumerate(kinds)]
    input_ids, _ = hf_inputs(family, prompt, images)
    ids, mm = llm.image_processor.process(llm.tokenizer.encode(prompt), images)
    assert ids == input_ids[0].tolist()  # the token count of each image is transformers'
    assert all(image.num_tokens > 16 for image in mm.images)
    want = hf_greedy(family, prompt, images)
    assert llm.generate(prompt, GREEDY, image_data=images)["output_ids"] == want
    # the reference depends on the image: other pictures give other tokens
    assert (
        hf_greedy(family, prompt, [draw(k + 7, im.size) for k, im in zip(kinds, images, strict=True)]) != want
    )


def test_token_counts_follow_the_hf_processor(llava_next_path: str) -> None:
    """LLaVA-NeXT's expansion equals transformers' LlavaNextProcessor's for every pinpoint and letterbox."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaNextProcessor

    from sgl_ray.model_loader import load_hf_config, resolve_model
    from sgl_ray.multimodal.processor import create_processor

    tokenizer = AutoTokenizer.from_pretrained(llava_next_path)
    hf = LlavaNextProcessor(
        image_processor=AutoImageProcessor.from_pretrained(llava_next_path),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    ours = create_processor(load_hf_config(resolve_model(llava_next_path)), llava_next_path)
    prompt = "A <image> B <image> C <image> D <image>"
    images = [draw(k, size) for k, size in enumerate([*SIZES, (48, 48)], 1)]
    want = hf(text=prompt, images=images, return_tensors="np")["input_ids"][0].tolist()
    assert ours.process(tokenizer.encode(prompt), images)[0] == want


def test_mixed_batch(family) -> None:
    """Requests with one image, none and two in one batch: the text request's rows stay plain."""
    llm = family[-1]
    (p1, _), (p2, _) = PROMPTS["one image"], PROMPTS["two images"]
    text = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    a, b, c = draw(5), draw(6, (40, 100)), draw(8, (100, 40))
    outs = llm.generate([p1, text, p2], GREEDY, image_data=[a, None, [b, c]])
    assert [o["output_ids"] for o in outs] == [
        hf_greedy(family, p1, [a]),
        hf_greedy(family, text, []),
        hf_greedy(family, p2, [b, c]),
    ]


def test_repeated_image_hits_the_caches(family) -> None:
    """The same image and prompt hit the radix cache through the image; the same image after other text misses
    the prefix but its embeddings come from the runner's cache (the tower runs once per image)."""
    llm = family[-1]
    cache = llm._core.runner.multimodal.cache
    prompt = "Zebra notes: <image> describe it in detail."
    image = draw(11, (100, 40))
    _, mm = llm.image_processor.process(llm.tokenizer.encode(prompt), [image])
    image_end = mm.images[0].offset + mm.images[0].num_tokens
    misses = cache.misses
    first = llm.generate(prompt, GREEDY, image_data=image)
    again = llm.generate(prompt, GREEDY, image_data=image)
    other = llm.generate(prompt, GREEDY, image_data=draw(12, (100, 40)))
    assert first["meta_info"]["cached_tokens"] < mm.images[0].offset + 1
    assert again["meta_info"]["cached_tokens"] >= image_end and again["output_ids"] == first["output_ids"]
    assert other["meta_info"]["cached_tokens"] == mm.images[0].offset  # the text before the image only
    assert cache.misses == misses + 2  # one tower run per image (each prefill chunk in it looks it up)
    hits = cache.hits
    moved = llm.generate("Yak notes, " + prompt, GREEDY, image_data=image)
    assert moved["meta_info"]["cached_tokens"] == 0 and cache.hits > hits and cache.misses == misses + 2
    assert moved["output_ids"] == hf_greedy(family, "Yak notes, " + prompt, [image])


def test_chat_image_part_runs_like_the_reference(family) -> None:
    """An OpenAI ``image_url`` part becomes ``<image>`` where it stood, and the ingress's prompt runs like the
    rendered text with the image."""
    import asyncio
    import base64
    import io

    from sgl_ray.model_loader import load_hf_config, resolve_model
    from sgl_ray.multimodal.chat import ImagePrompt, IngressImages
    from sgl_ray.protocol.requests import ChatMessage, ContentPart

    path, llm = family[0], family[-1]
    image, buffer = draw(13, (100, 40)), io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    message = ChatMessage(
        role="user",
        content=[
            ContentPart(type="text", text="Look"),
            ContentPart(type="image_url", image_url={"url": url}),
        ],
    )
    images = IngressImages.for_model(load_hf_config(resolve_model(path)), path)
    messages, urls, names = images.split([message])
    rendered = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": messages[0].text()}], add_generation_prompt=True, tokenize=False
    )
    assert "Look\n<image>" in rendered
    prompt = images.attach(llm.tokenizer.encode(rendered), urls, names)
    assert isinstance(prompt, ImagePrompt)

    async def run() -> list[int]:
        tokens: list[int] = []
        async for _, out in llm.astream_outputs(prompt, GREEDY, multimodal=prompt.multimodal):
            tokens.extend(out.token_ids)
        return tokens

    assert asyncio.run(run()) == hf_greedy(family, rendered, [image])


def checkpoint_in_layout(directory: Path, out: Path, layout: str) -> str:
    """The checkpoint with its tensors renamed: ``hub`` (the older hub layout: ``vision_tower.vision_model.*``)
    or ``in_memory`` (transformers 5's module names: ``model.language_model.*``, ``model.vision_tower.*``,
    ``lm_head.*``)."""
    from safetensors.torch import load_file, save_file

    def rename(name: str) -> str:
        if layout == "hub":
            return name.replace("vision_tower.", "vision_tower.vision_model.", 1)
        if name.startswith("language_model.lm_head."):
            return name.removeprefix("language_model.")
        return "model." + name.replace("language_model.model.", "language_model.", 1)

    weights = load_file(directory / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in weights)  # what transformers 5 writes
    save_file(
        {rename(k): v for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"}
    )
    for f in directory.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    return str(out)


def test_checkpoint_layouts_load(family, tmp_path: Path) -> None:
    """LLaVA-NeXT in the hub's layout, OneVision under transformers 5's module names (the rules are shared)."""
    layout = "in_memory" if is_onevision(family[1]) else "hub"
    path = checkpoint_in_layout(Path(family[0]), tmp_path, layout)
    prompt, kinds = PROMPTS["one image"]
    images = [draw(k, (84, 56)) for k in kinds]
    with sgl_ray.Engine(path, page_size=1) as llm:
        out = llm.generate(prompt, GREEDY, image_data=images)
    assert out["output_ids"] == hf_greedy(family, prompt, images)


def test_decoder_of_another_family_is_refused(llava_next_path: str, tmp_path: Path) -> None:
    from sgl_ray.errors import UnsupportedModelError

    shutil.copytree(llava_next_path, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["LlavaOnevisionForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'llama' language model"):
        sgl_ray.Engine(str(tmp_path))
