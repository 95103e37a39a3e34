"""Greedy outputs are token-identical to transformers on the same weights (fp32, CPU), in every scheduling regime:
single requests, concurrent mixed-length batches, prefix-cache hits, tiny prefill chunks, larger pages and
preemption under KV pressure."""

from __future__ import annotations

import pytest

import sgl_ray

from .prompts import PROMPTS, SHARED_PREFIX

NEW_TOKENS = 12
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}

MODELS = ["smollm2", "qwen2", "qwen3", "llama"]


@pytest.fixture(scope="module")
def model_paths(smollm2_path, tiny_llama_path, tiny_qwen2_path, tiny_qwen3_path):
    return {
        "smollm2": smollm2_path,
        "llama": tiny_llama_path,
        "qwen2": tiny_qwen2_path,
        "qwen3": tiny_qwen3_path,
    }


def _check(engine, reference, token_lists, new_tokens=NEW_TOKENS):
    outs = engine.generate(input_ids=token_lists, sampling_params={**GREEDY, "max_new_tokens": new_tokens})
    for ids, out in zip(token_lists, outs, strict=True):
        assert out["output_ids"] == reference(ids, new_tokens), f"mismatch for prompt of {len(ids)} tokens"
        assert out["meta_info"]["completion_tokens"] == new_tokens
    return outs


@pytest.mark.parametrize("name", MODELS)
def test_single_and_concurrent_requests(name, model_paths, hf_reference):
    with sgl_ray.Engine(model_paths[name]) as engine:
        tok = engine.tokenizer
        token_lists = [tok.encode(p) for p in PROMPTS]
        ref = hf_reference(name)
        # One at a time ...
        for ids in token_lists[:3]:
            _check(engine, ref, [ids])
        # ... and all 16 at once: mixed prefill + decode batches.
        _check(engine, ref, token_lists)


def test_norm_scales_folded_into_the_projections(model_paths, hf_reference, monkeypatch):
    """``fold_norm_weights`` (done on CUDA at load) keeps the model: SmolLM2's real norm scales moved into the
    QKV and gate/up weights, and the norms set to 1, still give transformers' greedy tokens (fp32, CPU)."""
    from sgl_ray.runner import model_runner

    monkeypatch.setattr(model_runner, "fold_norms_if_supported", lambda model, *_: model.fold_norm_weights())
    with sgl_ray.Engine(model_paths["smollm2"]) as engine:
        model = engine._core.runner.model.model
        assert model.norms_folded
        layer = model.layers[0]
        assert bool((layer.input_layernorm.weight == 1).all()) and bool(
            (layer.post_attention_layernorm.weight == 1).all()
        )
        assert not bool((model.norm.weight == 1).all())  # the final norm keeps its scale
        tok = engine.tokenizer
        _check(engine, hf_reference("smollm2"), [tok.encode(p) for p in PROMPTS[:4]])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_prefix_cache_hits(name, model_paths, hf_reference):
    with sgl_ray.Engine(model_paths[name]) as engine:
        tok = engine.tokenizer
        prefix = tok.encode(SHARED_PREFIX)
        token_lists = [prefix + tok.encode(q) for q in (" Q: Who wrote Hamlet? A:", " Q: Largest ocean? A:")]
        ref = hf_reference(name)
        first = _check(engine, ref, token_lists[:1])
        assert first[0]["meta_info"]["cached_tokens"] == 0
        outs = _check(engine, ref, token_lists)
        # The second batch reuses the shared prefix (and the first prompt entirely, bar its last token).
        assert outs[0]["meta_info"]["cached_tokens"] == len(token_lists[0]) - 1
        assert outs[1]["meta_info"]["cached_tokens"] >= len(prefix) - 1
        # Generated tokens were cached too: prompt + output of the first request matches up to its last token.
        again = engine.generate(input_ids=token_lists[0] + outs[0]["output_ids"], sampling_params=GREEDY)
        assert again["meta_info"]["cached_tokens"] == len(token_lists[0]) + NEW_TOKENS - 1


# SmolLM2 (real weights, flatter logits than the random models) checks the numerics of tiny chunks attending to
# KV computed in earlier chunks, which prefix-cache hits and recomputation after preemption also rely on; page sizes
# and cache bookkeeping are mechanics, checked on the random-weight models.
@pytest.mark.parametrize(("name", "page_size"), [("smollm2", 1), ("qwen3", 1), ("qwen3", 4), ("llama", 4)])
def test_small_prefill_chunks_and_pages(name, page_size, model_paths, hf_reference):
    with sgl_ray.Engine(model_paths[name], chunked_prefill_size=7, page_size=page_size) as engine:
        tok = engine.tokenizer
        token_lists = [tok.encode(p) for p in PROMPTS[:8]]
        ref = hf_reference(name)
        _check(engine, ref, token_lists)
        _check(engine, ref, token_lists[:4])  # again, now with prefix hits on page boundaries


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_preemption_keeps_outputs_exact(name, model_paths, hf_reference):
    # Room for two thirds of the batch at full length (204 prompt + 180 new tokens): requests must be preempted
    # and recomputed. The prompts and lengths are those of test_single_and_concurrent_requests, whose
    # transformers references this test reuses.
    with sgl_ray.Engine(model_paths[name], max_total_tokens=256, chunked_prefill_size=64) as engine:
        tok = engine.tokenizer
        token_lists = [tok.encode(p) for p in PROMPTS if len(tok.encode(p)) < 100]
        ref = hf_reference(name)
        _check(engine, ref, token_lists)
        stats = engine.get_stats()
        assert stats["num_preemptions"] > 0
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0
