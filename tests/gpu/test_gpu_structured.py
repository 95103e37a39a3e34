"""Structured outputs on CUDA: the GPU machine has no default model, so the test trains a small byte-level BPE
tokenizer and builds a tiny random Llama on its vocabulary. Constrained decoding with CUDA graphs, overlap
scheduling with deferred masks and jump-forward must give the tokens of one-step-at-a-time decoding, and valid
outputs. Run on the device machine (``pytest -m gpu``); skipped where there is no GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z][a-z0-9]{0,8}$"},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["name", "status", "count"],
    "additionalProperties": False,
}
REGEX = r"(red|green|blue)-[0-9]{2,4}"


def make_model(directory: Path) -> str:
    """A ByteLevel BPE tokenizer (vocabulary 512) trained on JSON-like text, and a random 2-layer Llama on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    corpus = [
        json.dumps({"name": f"n{i}", "status": s, "count": i})
        for i in range(200)
        for s in SCHEMA["properties"]["status"]["enum"]
    ]
    corpus += [f"red-{i} green-{i} blue-{i} Item {i}: write it as JSON." for i in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(fast), bos_token_id=0, eos_token_id=1, max_position_embeddings=2048, initializer_range=0.1,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_model(tmp_path_factory.mktemp("structured_model"))


def run(model: str, device: str, **engine_args) -> tuple[list[dict], dict]:
    import sgl_ray

    greedy = {"temperature": 0.0, "max_new_tokens": 48}
    params = [{**greedy, "json_schema": json.dumps(SCHEMA)}] * 6 + [{**greedy, "regex": REGEX}] * 4
    params += [{"temperature": 0.9, "seed": 11, "max_new_tokens": 48, "regex": REGEX}] * 2
    prompts = [f"Item {i}: write it as JSON." for i in range(len(params))]
    with sgl_ray.Engine(model, device=device, dtype="float32", max_total_tokens=8192, **engine_args) as eng:
        outs = eng.generate(prompts, params)
        return outs, eng._core.stats()


def check(model: str, device: str) -> None:
    import jsonschema

    ref, _ = run(
        model, device, disable_overlap_schedule=True, disable_jump_forward=True, disable_cuda_graph=True
    )
    for out in ref[:6]:
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert all(re.fullmatch(REGEX, o["text"]) for o in ref[6:])
    for jump in (False, True):
        outs, stats = run(model, device, disable_jump_forward=not jump)
        # sampled requests draw fewer random numbers when forced tokens are appended: compare them without it
        same = len(outs) if not jump else 10
        assert [o["output_ids"] for o in outs[:same]] == [o["output_ids"] for o in ref[:same]], jump
        assert all(re.fullmatch(REGEX, o["text"]) for o in outs[6:])
        assert stats["num_deferred_mask_steps"] > 0
        if jump:
            assert sum(o["meta_info"]["jump_forward_tokens"] for o in outs) > 0


def test_constrained_decoding_with_graphs_overlap_and_jump_forward(model_dir):
    check(model_dir, "cuda")
