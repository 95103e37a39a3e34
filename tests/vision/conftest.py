"""Vision test fixtures: the tiny Qwen2-VL builders live in ``tiny_vl`` (the session's ``qwen2_vl_path`` comes from
the root conftest, its Serve app ``vision_app_url`` from here); the tiny LLaVA models are built here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sgl_ray.model_loader import load_tokenizer, resolve_model

from .tiny_vl import IMAGE, NO_TOKENIZER_IDS, VISION_TOKENS, draw, save_tiny_vl  # noqa: F401  (re-exported)


@pytest.fixture(scope="session")
def qwen2_5_vl_path(tmp_path_factory: pytest.TempPathFactory, smollm2_path: str) -> str:
    return save_tiny_vl(tmp_path_factory.mktemp("qwen2_5_vl"), smollm2_path, "qwen2_5_vl")


@pytest.fixture(scope="package")
def vision_app_url(serve_url: str, qwen2_vl_path: str):
    """The base URL of a Serve app of the tiny Qwen2-VL at ``/vision`` (no API key), shared by the vision Serve
    tests (the frontend language's among them) and gone after them: starting an app takes a while. TP=2: the replica's engine runs over
    Ray shard actors, so the images travel in the step plan to both ranks. Tests that count prefix-cache hits flush
    it first or after."""
    from ray import serve

    from sgl_ray.deployments import build_openai_app

    config = {"model_path": qwen2_vl_path, "max_total_tokens": 4096, "served_model_name": "vl", "tp_size": 2}
    # image URL limits that test_vision_http.py probes (its LIMIT)
    config |= {"image_fetch_timeout_s": 1.0, "image_fetch_max_redirects": 3, "max_image_bytes": 64 * 1024}
    serve.run(build_openai_app(config), name="vision", route_prefix="/vision")
    yield f"{serve_url}/vision"
    serve.delete("vision")


@pytest.fixture(scope="package")
def vision_client(vision_app_url: str):
    """The official ``openai`` client of the session's Serve app of the tiny Qwen2-VL (``vision_app_url``)."""
    import openai

    return openai.OpenAI(base_url=f"{vision_app_url}/v1", api_key="unused", max_retries=0)


LLAVA_PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # crops of 32 pixels: 1x2, 2x1 or 2x2 per image


def save_tiny_llava(directory: Path, tokenizer_dir: str, family: str) -> str:
    """Random weights of a tiny ``llava_next`` (CLIP tower on a Llama decoder; features of layer -2 without the
    class token) or ``llava_onevision`` (SigLIP tower on a Qwen2 decoder; the last layer's features, grids over
    about 2 crops scaled down) model: crops of 32 pixels in 4 x 4 patches, the tokenizer of ``tokenizer_dir``
    (:func:`llava_tokenizer_dir`), and the family's HF image processor."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    image, video = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        initializer_range=0.2,
    )
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,  # peaked logits: greedy comparisons are not decided by rounding
    )
    common = dict(image_token_id=image, image_grid_pinpoints=LLAVA_PINPOINTS, tie_word_embeddings=False)
    if family == "llava_next":
        model_cls = transformers.LlavaNextForConditionalGeneration
        config = transformers.LlavaNextConfig(
            vision_config=dict(model_type="clip_vision_model", projection_dim=32, **vision),
            text_config=dict(model_type="llama", **text),
            **common,
        )
        processor = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=LLAVA_PINPOINTS,
        )
    else:
        model_cls = transformers.LlavaOnevisionForConditionalGeneration
        config = transformers.LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", **vision),
            text_config=dict(model_type="qwen2", **text),
            video_token_id=video,
            vision_aspect_ratio="anyres_max_2",
            **common,
        )
        processor = transformers.LlavaOnevisionImageProcessorPil(
            size={"height": 32, "width": 32}, image_grid_pinpoints=LLAVA_PINPOINTS
        )
    config.architectures = [model_cls.__name__]
    torch.manual_seed(0)
    model_cls(config).to(torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def llava_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_path: str) -> str:
    """SmolLM2's tokenizer plus LLaVA's ``<image>`` and ``<video>`` tokens, saved once for both families."""
    directory = tmp_path_factory.mktemp("llava_tokenizer")
    tokenizer = load_tokenizer(resolve_model(smollm2_path))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def llava_next_path(tmp_path_factory: pytest.TempPathFactory, llava_tokenizer_dir: str) -> str:
    return save_tiny_llava(tmp_path_factory.mktemp("llava_next"), llava_tokenizer_dir, "llava_next")


@pytest.fixture(scope="session")
def llava_onevision_path(tmp_path_factory: pytest.TempPathFactory, llava_tokenizer_dir: str) -> str:
    return save_tiny_llava(tmp_path_factory.mktemp("llava_onevision"), llava_tokenizer_dir, "llava_onevision")
