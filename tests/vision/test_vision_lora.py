"""Multi-LoRA on the language model of a vision-language model: PEFT adapters made on the tiny Qwen2-VL (and
LLaVA-OneVision) serve image requests, mixed in one batch with other adapters and the base model, and give the
greedy tokens of transformers + peft on the same adapter, image and prompt. An adapter that reaches into the vision
tower is refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sgl_ray
from sgl_ray.errors import InvalidRequestError

from .tiny_vl import IMAGE, draw

peft = pytest.importorskip("peft")

MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (rank, alpha, target modules, rsLoRA); the vision tower's modules are named otherwise (qkv, proj, fc1, fc2)
ADAPTERS = {
    "v0": (8, 16, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], False),
    "v1": (4, 8, ["q_proj", "k_proj", "up_proj"], True),
}
PROMPT = f"<|im_start|>user\n{IMAGE}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"


def hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def make_adapter(base: str, directory: Path, rank: int, alpha: int, targets, rslora: bool, seed: int) -> str:
    """A PEFT adapter on ``base`` with random A and B (PEFT starts B at zero, which would change nothing)."""
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0
    )
    model = peft.get_peft_model(hf_model(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def adapters(qwen2_vl_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vision_lora")
    return {
        name: make_adapter(qwen2_vl_path, root / name, *spec, seed=i)
        for i, (name, spec) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def reference(qwen2_vl_path: str, adapters: dict[str, str]):
    """``reference(adapter or None, prompt, image)``: greedy tokens of transformers' Qwen2-VL + peft."""
    from transformers import AutoImageProcessor, AutoTokenizer

    model = peft.PeftModel.from_pretrained(hf_model(qwen2_vl_path), adapters["v0"], adapter_name="v0")
    model.load_adapter(adapters["v1"], adapter_name="v1")
    model.eval()
    image_processor = AutoImageProcessor.from_pretrained(qwen2_vl_path)
    tokenizer = AutoTokenizer.from_pretrained(qwen2_vl_path)
    pad = model.config.image_token_id
    memo: dict[tuple, list[int]] = {}

    def greedy(adapter: str | None, prompt: str, image) -> list[int]:
        key = (adapter, prompt, None if image is None else (image.size, image.tobytes()))
        if key not in memo:
            memo[key] = generate(adapter, prompt, image)
        return memo[key]

    def generate(adapter: str | None, prompt: str, image) -> list[int]:
        kwargs = {}
        ids = tokenizer.encode(prompt)
        if image is not None:  # the placeholder expanded by Qwen2VLProcessor's rule (grid / merge**2)
            kwargs = dict(image_processor(images=[image], return_tensors="pt"))
            count = int(kwargs["image_grid_thw"][0].prod() // 4)
            ids = [x for t in ids for x in ([pad] * count if t == pad else [t])]
        input_ids = torch.tensor([ids])
        if image is not None:
            kwargs["mm_token_type_ids"] = (input_ids == pad).int()
        if adapter is None:
            ctx = model.disable_adapter()
        else:
            model.set_adapter(adapter)
            ctx = torch.no_grad()
        with ctx, torch.no_grad():  # an explicit mask: the pad id (2) is <|im_end|> in this tokenizer
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=MAX_NEW,
                min_new_tokens=MAX_NEW,
                do_sample=False,
                **kwargs,
            )
        return out[0, input_ids.shape[1] :].tolist()

    return greedy


def test_adapters_touch_the_decoder_only(adapters: dict[str, str]) -> None:
    from safetensors.torch import load_file

    for path in adapters.values():
        names = list(load_file(str(Path(path) / "adapter_model.safetensors")))
        assert names and all(".language_model.layers." in n for n in names)


def test_image_batch_mixes_adapters_and_base(qwen2_vl_path: str, adapters, reference) -> None:
    """One ``generate`` batch: an image request under each adapter, one on the base model, and a text request
    under an adapter. Then the same image and prompt under another adapter misses the prefix cache from the image
    on (the radix tree has one namespace per adapter) and still gives peft's tokens, and under its own adapter
    hits through the image."""
    text = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    a, b, c = draw(1), draw(2, (56, 84)), draw(3, (112, 56))
    paths = [f"{name}={path}" for name, path in adapters.items()]
    with sgl_ray.Engine(qwen2_vl_path, lora_paths=paths, chunked_prefill_size=16, page_size=1) as llm:
        outs = llm.generate(
            [PROMPT, PROMPT, PROMPT, text],
            GREEDY,
            image_data=[a, b, c, None],
            lora_path=["v0", "v1", None, "v1"],
        )
        again = llm.generate(PROMPT, GREEDY, image_data=a, lora_path="v1")
        same = llm.generate(PROMPT, GREEDY, image_data=a, lora_path="v0")
        _, mm = llm.image_processor.process(llm.tokenizer.encode(PROMPT), [a])
    want = [
        reference("v0", PROMPT, a),
        reference("v1", PROMPT, b),
        reference(None, PROMPT, c),
        reference("v1", text, None),
    ]
    assert [o["output_ids"] for o in outs] == want
    start, end = mm.images[0].offset, mm.images[0].offset + mm.images[0].num_tokens
    # v1's text request shares the text before the image; v0 ran this image, so it hits through it
    assert again["meta_info"]["cached_tokens"] == start
    assert again["output_ids"] == reference("v1", PROMPT, a)
    assert same["meta_info"]["cached_tokens"] >= end
    assert same["output_ids"] == want[0]
    # the adapters change the tokens of the same image and prompt
    assert len({tuple(reference(name, PROMPT, a)) for name in ("v0", "v1", None)}) == 3


def test_adapter_on_the_vision_tower_is_refused(qwen2_vl_path: str, tmp_path: Path) -> None:
    """A target regex that also catches the tower's ``qkv``: refused when the engine starts, and on hot load."""
    adapter = make_adapter(qwen2_vl_path, tmp_path / "tower", 4, 8, r".*(q_proj|attn\.qkv)", False, seed=5)
    with pytest.raises(InvalidRequestError, match="vision tower"):
        sgl_ray.Engine(qwen2_vl_path, lora_paths=[f"tower={adapter}"], page_size=1)
    with sgl_ray.Engine(qwen2_vl_path, enable_lora=True, page_size=1) as llm:
        with pytest.raises(InvalidRequestError, match="vision tower"):
            llm.load_lora_adapter("tower", adapter)
        assert llm.list_lora_adapters() == {}


def test_llava_onevision_adapter_on_its_language_model(llava_onevision_path: str, tmp_path: Path) -> None:
    """SigLIP's attention is named like the decoder's (q_proj, ...): a plain module list reaches into the tower and
    is refused; a regex on the language model serves image requests with transformers + peft's tokens."""
    plain = make_adapter(llava_onevision_path, tmp_path / "plain", 4, 8, ["q_proj", "v_proj"], False, seed=6)
    with pytest.raises(InvalidRequestError, match="vision tower"):
        sgl_ray.Engine(llava_onevision_path, lora_paths=[f"plain={plain}"], page_size=1)
    targets = r".*language_model.*\.(" + "|".join(DECODER) + ")"
    lm = make_adapter(llava_onevision_path, tmp_path / "lm", 8, 16, targets, False, seed=7)

    from transformers import AutoImageProcessor, AutoTokenizer

    from .test_llava import hf_inputs

    prompt = "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"
    image = draw(1, (84, 56))
    base = hf_model(llava_onevision_path)
    tokenizer = AutoTokenizer.from_pretrained(llava_onevision_path)
    processor = AutoImageProcessor.from_pretrained(llava_onevision_path)
    input_ids, kwargs = hf_inputs((None, base, processor, tokenizer, None), prompt, [image])
    model = peft.PeftModel.from_pretrained(base, lm).eval()
    want = {}
    for name in ("lm", None):
        with model.disable_adapter() if name is None else torch.no_grad(), torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=MAX_NEW,
                min_new_tokens=MAX_NEW,
                do_sample=False,
                **kwargs,
            )
        want[name] = out[0, input_ids.shape[1] :].tolist()
    assert want["lm"] != want[None]
    with sgl_ray.Engine(llava_onevision_path, lora_paths=[f"lm={lm}"], page_size=1) as llm:
        outs = llm.generate([prompt, prompt], GREEDY, image_data=[image, image], lora_path=["lm", None])
    assert [o["output_ids"] for o in outs] == [want["lm"], want[None]]
