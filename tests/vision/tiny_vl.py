"""A tiny random-weight Qwen2-VL (vision depth 2, hidden 64) with a processor built here: SmolLM2's tokenizer plus
Qwen2-VL's vision tokens, and the HF image processor set to small grids. Images are drawn with PIL. (A plain module:
the root conftest builds the session's model and its Serve app from it, and the vision and lang tests share them.)"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sgl_ray.model_loader import load_tokenizer, resolve_model

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def draw(kind: int, size: tuple[int, int] = (84, 56)) -> Image.Image:
    """A distinct picture per ``kind`` (shapes and colours vary with it)."""
    image = Image.new("RGB", size, (30 * kind % 256, 80, 200 - 20 * kind % 200))
    pen = ImageDraw.Draw(image)
    w, h = size
    pen.rectangle([w // 8 + kind, h // 6, w // 2, h // 2 + kind], fill=(250, 40 * kind % 256, 10))
    pen.ellipse([w // 2, h // 3, w - 4, h - 4], fill=(20, 220, 60 * kind % 256))
    return image


NO_TOKENIZER_IDS = (
    996,
    997,
    998,
    999,
)  # vision start, end, image pad, video pad of a model saved without one


def save_tiny_vl(directory: Path, smollm2_path: str | None, family: str) -> str:
    """Random weights of a tiny ``qwen2_vl`` or ``qwen2_5_vl`` model, its tokenizer and image processor; without
    ``smollm2_path`` (the GPU machine cannot download it) no tokenizer, a vocabulary of 1000 and the vision tokens'
    ids :data:`NO_TOKENIZER_IDS`."""
    import transformers

    tokenizer = None
    if smollm2_path is None:
        start, end, image, video = NO_TOKENIZER_IDS
    else:
        tokenizer = load_tokenizer(resolve_model(smollm2_path))
        tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
        start, end, image, video = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    vision["initializer_range"] = 0.2  # the image moves the greedy tokens
    if family == "qwen2_vl":
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    else:  # windows of 2 x 2 merge units; block 1 attends over the whole image
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision.update(
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=48,
            window_size=56,
            fullatt_block_indexes=[1],
        )
    config = config_cls(
        architectures=[model_cls.__name__],
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer) + 4 if tokenizer is not None else 1000,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            initializer_range=0.2,  # peaked logits: greedy comparisons are not decided by rounding
        ),
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model_cls(config).to(torch.float32).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    pixels = 28 * 28
    transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * pixels, "longest_edge": 16 * pixels}
    ).save_pretrained(directory)
    return str(directory)
