"""The embedded SmolLM2 Q4_1 GGUF kept quantized (``quantization="gguf"``) gives the greedy tokens of the file
dequantized at load (transformers on the same file, the reference the default dequantizing path matches in
``test_greedy_exact.py``), while its weights take exactly the bytes of the file's tensors: under a fifth of the
float32 weights."""

from __future__ import annotations

import math

import sgl_ray
from sgl_ray.layers.quantization import QuantizedWeight
from sgl_ray.model_loader.gguf_header import GGUFFile

from .prompts import PROMPTS

NEW_TOKENS = 6
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
CHOSEN = [PROMPTS[3], PROMPTS[12]]  # long, multi-byte


def test_kept_quantized_matches_dequantized(smollm2_path, hf_reference):
    reference = hf_reference("smollm2")
    with sgl_ray.Engine(smollm2_path, quantization="gguf", max_total_tokens=512) as engine:
        token_lists = [engine.tokenizer.encode(p) for p in CHOSEN]
        outs = engine.generate(input_ids=token_lists, sampling_params=GREEDY)
        for ids, out in zip(token_lists, outs, strict=True):
            assert out["output_ids"] == reference(ids, NEW_TOKENS), f"mismatch for a {len(ids)}-token prompt"
        held = engine.get_stats()["weight_bytes"]
        model = engine._core.runner.model
        # the tied LM head multiplies by the embedding's quantized table itself (no float copy)
        assert isinstance(model.model.embed_tokens.weight, QuantizedWeight)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    tensors = GGUFFile(smollm2_path).tensors
    assert held == sum(t.data.nbytes for t in tensors)  # blocks as stored, norms as float32
    float32_bytes = sum(4 * math.prod(t.shape) for t in tensors)  # what dequantizing at load holds, at least
    assert held < float32_bytes / 5, (held, float32_bytes)
