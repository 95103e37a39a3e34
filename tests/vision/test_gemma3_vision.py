"""Gemma 3 image inputs end to end: a tiny random-weight ``Gemma3ForConditionalGeneration`` (SigLIP tower of 4 x 4
patches pooled to 4 soft tokens, a local and a global decoder layer) gives transformers' greedy tokens, whose mask
lets the tokens of one image see each other; the expanded prompt equals ``Gemma3Processor``'s; a repeated image
hits the prefix cache; the Triton attention backend (in Triton's CPU interpreter, and on CUDA) gives the same;
FlashInfer, whose masks are causal, is refused at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sgl_ray

from .tiny_vl import draw

MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
IMAGE_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
WINDOW = 6  # the local layer's window: shorter than an image with its markers and newlines
PAGE = 4  # KV page size: a prefix-cache hit may end inside an image (a page boundary there)

PROMPTS = {
    "one image": (
        "<|im_start|>user\n<start_of_image>What is in the picture?<|im_end|>\n<|im_start|>assistant\n",
        1,
    ),
    "two images": ("Compare <start_of_image> and<start_of_image>\nplease.", 2),
    "image between turns": (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n"
        "<|im_start|>user\nLook:\n<start_of_image><|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n"
        "<|im_start|>assistant\n",
        1,
    ),
}


def save_tiny_gemma3(directory: Path, tokenizer_dir: str) -> str:
    """Random fp32 weights (norms drawn from N(0, 0.5), so Gemma's ``1 + weight`` matters), the tokenizer of
    ``tokenizer_dir`` (SmolLM2's, shared with the LLaVA tests) with Gemma 3's image tokens, and Gemma 3's image
    processor at 32 x 32 pixels."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
    boi, eoi, soft = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS.values()))
    config = transformers.Gemma3Config(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            initializer_range=0.2,  # peaked logits: greedy comparisons are not decided by rounding
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            vision_use_head=False,
        ),
        mm_tokens_per_image=4,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=soft,
        initializer_range=0.2,
        tie_word_embeddings=False,  # greedy tokens vary more than with a tied head
        architectures=["Gemma3ForConditionalGeneration"],
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
            elif name.endswith("mm_input_projection_weight"):
                param.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tokenizer_config = directory / "tokenizer_config.json"  # Gemma3Processor reads the image tokens' names
    settings = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps(settings | {"extra_special_tokens": IMAGE_TOKENS}))
    transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory, llava_tokenizer_dir: str):
    """(path, transformers model, transformers' Gemma3Processor, engine)."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
    )

    path = save_tiny_gemma3(tmp_path_factory.mktemp("gemma3_vl"), llava_tokenizer_dir)
    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = Gemma3Processor(
        image_processor=AutoImageProcessor.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        image_seq_length=4,
    )
    # prefill chunks of 6 tokens would cut the 4-token images: the scheduler ends them at image edges
    with sgl_ray.Engine(path, chunked_prefill_size=6, page_size=PAGE) as llm:
        yield path, model, processor, llm


def hf_greedy(gemma3, prompt: str, images: list, bidirectional: bool = True) -> list[int]:
    """transformers' greedy tokens for the processor's inputs (without ``token_type_ids``, its mask is causal)."""
    _, model, processor, _ = gemma3
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    if not bidirectional:
        inputs.pop("token_type_ids")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("case", list(PROMPTS))
def test_greedy_equals_transformers(gemma3, case: str) -> None:
    """Our expansion of the tokenized prompt is the processor's, and the greedy tokens are transformers'."""
    _, _, processor, llm = gemma3
    prompt, count = PROMPTS[case]
    images = [draw(k, (84, 56) if k % 2 else (40, 100)) for k in range(1, count + 1)]
    ids, mm = llm.image_processor.process(llm.tokenizer.encode(prompt), images)
    assert ids == processor(text=prompt, images=images)["input_ids"][0]
    assert [image.num_tokens for image in mm.images] == [4] * count
    want = hf_greedy(gemma3, prompt, images)
    assert llm.generate(prompt, GREEDY, image_data=images)["output_ids"] == want


def test_mixed_batch(gemma3) -> None:
    """Requests with one image, none and two in one step: each request's images widen its own mask only."""
    llm = gemma3[-1]
    (p1, _), (p2, _) = PROMPTS["one image"], PROMPTS["two images"]
    text = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    a, b, c = draw(5), draw(6, (40, 100)), draw(8, (100, 40))
    outs = llm.generate([p1, text, p2], GREEDY, image_data=[a, None, [b, c]])
    assert [o["output_ids"] for o in outs] == [
        hf_greedy(gemma3, p1, [a]),
        hf_greedy(gemma3, text, []),
        hf_greedy(gemma3, p2, [b, c]),
    ]


def hf_prompt_logprobs(gemma3, prompt: str, images: list, bidirectional: bool) -> torch.Tensor:
    """[n - 1] transformers' log-probability of each prompt token after the first."""
    _, model, processor, _ = gemma3
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    if not bidirectional:
        inputs.pop("token_type_ids")
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, ids[1:, None])[:, 0]


def test_prompt_logprobs_follow_the_bidirectional_mask(gemma3) -> None:
    """Every prompt token's log-probability is transformers' under its mask (the tokens of an image see each
    other), which differs from a causal mask's by far more than rounding; other pictures give other tokens."""
    llm = gemma3[-1]
    prompt, _ = PROMPTS["two images"]
    images = [draw(1), draw(2, (40, 100))]
    out = llm.generate(prompt, GREEDY, image_data=images, return_logprob=True, logprob_start_len=0)
    ours = torch.tensor([lp for lp, _ in out["meta_info"]["input_token_logprobs"][1:]])
    want = hf_prompt_logprobs(gemma3, prompt, images, bidirectional=True)
    causal = hf_prompt_logprobs(gemma3, prompt, images, bidirectional=False)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-4)
    assert (causal - want).abs().max() > 0.1
    assert out["output_ids"] == hf_greedy(gemma3, prompt, images)
    assert hf_greedy(gemma3, prompt, [draw(8), draw(9, (40, 100))]) != out["output_ids"]


def test_expansion_equals_gemma3_processor(gemma3) -> None:
    """Newlines of the expansion that merge with the text around an image (``\\n`` + ``\\n\\n`` is one token
    here), images at the start, the end and side by side, and text without images, as ``Gemma3Processor``."""
    _, _, processor, llm = gemma3
    prompts = [
        "<start_of_image>",
        "A\n<start_of_image>\nB <start_of_image><start_of_image> C\n\n",
        "<|im_start|>user\n\n<start_of_image><|im_end|> done <start_of_image>",
    ]
    for prompt in prompts:
        images = [draw(k) for k in range(prompt.count("<start_of_image>"))]
        ids, mm = llm.image_processor.process(llm.tokenizer.encode(prompt), images)
        assert ids == processor(text=prompt, images=images)["input_ids"][0], prompt
        for image in mm.images:
            soft = ids[image.offset - 1 : image.offset + image.num_tokens + 1]
            assert soft == llm.tokenizer.convert_tokens_to_ids(
                ["<start_of_image>", *["<image_soft_token>"] * 4, "<end_of_image>"]
            )


def test_chat_image_part(gemma3) -> None:
    """An OpenAI ``image_url`` part becomes ``<start_of_image>`` where it stood; the ingress's prompt is the
    processor's expansion, and the ``data:`` URL runs like the PIL image."""
    import base64
    import io

    from sgl_ray.model_loader import load_hf_config, resolve_model
    from sgl_ray.multimodal.chat import IngressImages
    from sgl_ray.protocol.requests import ChatMessage, ContentPart

    path, _, processor, llm = gemma3
    image, buffer = draw(13, (100, 40)), io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    parts = [ContentPart(type="text", text="Look"), ContentPart(type="image_url", image_url={"url": url})]
    images = IngressImages.for_model(load_hf_config(resolve_model(path)), path)
    assert images is not None
    messages, urls, names = images.split([ChatMessage(role="user", content=parts)])
    text = messages[0].text()
    assert text == "Look\n<start_of_image>"
    prompt = images.attach(llm.tokenizer.encode(text), urls, names)
    assert list(prompt) == processor(text=text, images=[image])["input_ids"][0]
    assert llm.generate(text, GREEDY, image_data=url)["output_ids"] == hf_greedy(gemma3, text, [image])


def test_repeated_image_hits_the_prefix_cache(gemma3) -> None:
    """The same image and prompt hit the radix cache through the image; another image stops it before."""
    llm = gemma3[-1]
    prompt = "Zebra notes: <start_of_image> describe it in detail."
    image = draw(11, (100, 40))
    _, mm = llm.image_processor.process(llm.tokenizer.encode(prompt), [image])
    start, end = mm.images[0].offset, mm.images[0].offset + mm.images[0].num_tokens
    first = llm.generate(prompt, GREEDY, image_data=image)
    again = llm.generate(prompt, GREEDY, image_data=image)
    other = llm.generate(prompt, GREEDY, image_data=draw(12, (100, 40)))
    assert first["meta_info"]["cached_tokens"] < start
    assert again["meta_info"]["cached_tokens"] >= end and again["output_ids"] == first["output_ids"]
    assert other["meta_info"]["cached_tokens"] == start // PAGE * PAGE  # whole pages before the image
    assert first["output_ids"] == hf_greedy(gemma3, prompt, [image])


def test_cache_hit_inside_an_image(gemma3) -> None:
    """A prefix-cache hit that ends inside an image (at a page boundary): the cached tokens of the image were
    computed seeing the whole image, and the rest of it is computed in one step, so the tokens are still
    transformers'."""
    llm = gemma3[-1]
    image = draw(14, (100, 40))
    first, second = "Yak: <start_of_image> describe it.", "Yak: <start_of_image> tell a story."
    _, mm = llm.image_processor.process(llm.tokenizer.encode(second), [image])
    start, end = mm.images[0].offset, mm.images[0].offset + mm.images[0].num_tokens
    llm.generate(first, GREEDY, image_data=image)
    out = llm.generate(second, GREEDY, image_data=image)
    assert start < out["meta_info"]["cached_tokens"] < end
    assert out["output_ids"] == hf_greedy(gemma3, second, [image])


def test_refused_where_an_image_could_be_split(gemma3) -> None:
    """FlashInfer has causal masks only: refused at start, naming the way out; the torch and Triton backends
    (the default on CUDA) take the image mask. Chunked prefill is not refused (chunks end at image edges)."""
    from sgl_ray.configs.engine_args import EngineArgs
    from sgl_ray.errors import UnsupportedModelError
    from sgl_ray.model_loader import load_hf_config, resolve_model
    from sgl_ray.multimodal.config import check_engine_args

    path = gemma3[0]
    hf_config = load_hf_config(resolve_model(path))
    with pytest.raises(
        UnsupportedModelError, match="'flashinfer' attention backend.*attention_backend='triton'"
    ):
        check_engine_args(hf_config, EngineArgs(model_path=path, attention_backend="flashinfer"))
    for backend in ("torch", "triton"):
        args = EngineArgs(model_path=path, chunked_prefill_size=64, attention_backend=backend)
        check_engine_args(hf_config, args)
    check_engine_args(hf_config, EngineArgs(model_path=path, device="cuda"))  # the default: triton


# Run by Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before Triton is imported: a process of its own).
# Whole prompts per step, so an image's tokens sit amid text in one extend; the second pair of requests hits the
# prefix cache inside the image (a page boundary), so the rest of the image is a step's first tokens. A few new
# tokens each (the interpreter is slow; decode steps are causal anyway): transformers' greedy tokens begin so.
INTERPRETED = {**GREEDY, "max_new_tokens": 3}
_TRITON_ENGINE = """
import json, sys
import sgl_ray
from tests.vision.tiny_vl import draw
path, greedy, one, two, text, first, second = json.loads(sys.argv[1])
with sgl_ray.Engine(path, attention_backend="triton", page_size=4) as llm:
    batch = llm.generate([one, text, two], greedy, image_data=[draw(5), None, [draw(6, (40, 100)), draw(8, (100, 40))]],
                         return_logprob=True, logprob_start_len=0)
    llm.generate(first, {**greedy, "max_new_tokens": 1}, image_data=draw(14, (100, 40)))
    hit = llm.generate(second, greedy, image_data=draw(14, (100, 40)))
print(json.dumps({
    "batch": [o["output_ids"] for o in batch],
    "logprobs": [lp for lp, _ in batch[2]["meta_info"]["input_token_logprobs"][1:]],
    "hit": hit["output_ids"], "cached": hit["meta_info"]["cached_tokens"],
}))
"""


def test_triton_backend_in_the_interpreter(gemma3) -> None:
    """attention_backend="triton" (its extend kernel with the image mask, run by Triton's interpreter): a mixed
    batch of one image, text and two images in one step gives transformers' greedy tokens and prompt
    log-probabilities; a cache hit that ends inside an image too."""
    path, _, processor, llm = gemma3
    (one, _), (two, _) = PROMPTS["one image"], PROMPTS["two images"]
    text = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    first, second = "Yak: <start_of_image> describe it.", "Yak: <start_of_image> tell a story."
    args = json.dumps([path, INTERPRETED, one, two, text, first, second])
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    run = subprocess.run(
        [sys.executable, "-c", _TRITON_ENGINE, args], env=env, capture_output=True, text=True, cwd=root
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    pair = [draw(6, (40, 100)), draw(8, (100, 40))]
    new = INTERPRETED["max_new_tokens"]
    assert got["batch"] == [
        hf_greedy(gemma3, one, [draw(5)])[:new],
        hf_greedy(gemma3, text, [])[:new],
        hf_greedy(gemma3, two, pair)[:new],
    ]
    want = hf_prompt_logprobs(gemma3, two, pair, bidirectional=True)
    torch.testing.assert_close(torch.tensor(got["logprobs"]), want, rtol=0, atol=1e-4)
    image = draw(14, (100, 40))
    _, mm = llm.image_processor.process(llm.tokenizer.encode(second), [image])
    assert mm.images[0].offset < got["cached"] < mm.images[0].offset + mm.images[0].num_tokens
    assert got["hit"] == hf_greedy(gemma3, second, [image])[:new]


def save_byte_tokenizer(directory: Path) -> str:
    """A byte-level tokenizer built here (no merges: one token per byte, plus the chat markers), for machines
    that cannot download SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials[3:]})
    fast.save_pretrained(directory)
    return str(directory)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_greedy_equals_transformers(tmp_path: Path) -> None:
    """On CUDA with the default (Triton) backend, CUDA graphs for the decode steps after the images: a mixed
    batch and a cache hit inside an image give transformers' greedy tokens (float32 on both sides). The tiny
    model takes a byte-level tokenizer built here (the GPU machine cannot download SmolLM2's)."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
    )

    (tmp_path / "tok").mkdir()
    (tmp_path / "model").mkdir()
    path = save_tiny_gemma3(tmp_path / "model", save_byte_tokenizer(tmp_path / "tok"))
    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = Gemma3Processor(
        image_processor=AutoImageProcessor.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path),
        image_seq_length=4,
    )
    reference = (path, model, processor, None)
    (one, _), (two, _) = PROMPTS["one image"], PROMPTS["two images"]
    text = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    a, b, c, d = draw(5), draw(6, (40, 100)), draw(8, (100, 40)), draw(14, (100, 40))
    # one token per byte: the image is positions 6-9 and the prompts part after it at 14, so 8-token pages
    # give a cache hit of 8 tokens, inside the image
    first, second = "Yak<start_of_image> describe it.", "Yak<start_of_image> tell a story."
    with sgl_ray.Engine(path, device="cuda", dtype="float32", page_size=8) as llm:
        outs = llm.generate([one, text, two], GREEDY, image_data=[a, None, [b, c]])
        llm.generate(first, GREEDY, image_data=d)
        hit = llm.generate(second, GREEDY, image_data=d)
        _, mm = llm.image_processor.process(llm.tokenizer.encode(second), [d])
    assert [o["output_ids"] for o in outs] == [
        hf_greedy(reference, one, [a]),
        hf_greedy(reference, text, []),
        hf_greedy(reference, two, [b, c]),
    ]
    start, end = mm.images[0].offset, mm.images[0].offset + mm.images[0].num_tokens
    assert start < hit["meta_info"]["cached_tokens"] < end
    assert hit["output_ids"] == hf_greedy(reference, second, [d])


def test_prefill_chunks_end_at_image_edges() -> None:
    """A chunk that would end inside an image ends at its start instead, or, when the image starts at or before
    the chunk's start (a budget smaller than the image), at its end; models with causal images keep the cut."""
    import numpy as np

    from sgl_ray.multimodal.inputs import ImageItem, MultimodalInputs

    images = [ImageItem(1, 10, 8, (1, 1, 1), np.zeros(1)), ImageItem(2, 30, 4, (1, 1, 1), np.zeros(1))]
    mm = MultimodalInputs(images, np.zeros((3, 40), dtype=np.int64), 0, 7, whole_images=True)
    assert mm.chunk_end(0, 6) == 6  # before any image
    assert mm.chunk_end(0, 14) == 10  # back to the first image's start
    assert mm.chunk_end(10, 12) == 18  # the chunk starts at the image: on to its end
    assert mm.chunk_end(12, 14) == 18  # resumed inside an image (a cache hit): on to its end
    assert mm.chunk_end(18, 32) == 30 and mm.chunk_end(0, 40) == 40
    causal = MultimodalInputs(images, np.zeros((3, 40), dtype=np.int64), 0, 7)
    assert causal.chunk_end(0, 14) == 14
