"""Dense families beyond Llama/Qwen in-process (CPU, fp32): greedy tokens equal transformers' on the same tiny
random weights — OLMo 2 (post-norms, whole-projection q/k norms), Granite (the four multipliers, tied
embeddings), Phi-3 (fused checkpoint tensors, LongRoPE on both sides of its original context, partial rotary),
GLM-4 (sandwich norms, interleaved partial rotary), Llama 3.2 (tied embeddings) — and the sliding windows of
Mistral and Qwen2/3 (``use_sliding_window``, ``max_window_layers``) past the window, through prefill chunks and a
prefix-cache hit that spans more than the window."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Glm4Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

import sgl_ray

from ..conftest import _TINY_SHAPE, GreedyReference, _hf_model, save_tiny_model
from .prompts import PROMPTS, SHARED_PREFIX

NEW = 10
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
WINDOW = 16
PHI3_ORIGINAL_CONTEXT = 32  # LongRoPE switches to its long factors past this many tokens


def family_config(name: str) -> PretrainedConfig:
    """Two layers of the shared tiny shape (head_dim 16, SmolLM2's vocabulary) with each family's quirks."""
    if name == "olmo2":
        return Olmo2Config(**_TINY_SHAPE, num_hidden_layers=2, tie_word_embeddings=False)
    if name == "granite":
        return GraniteConfig(
            **_TINY_SHAPE,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            embedding_multiplier=6.0,
            residual_multiplier=0.5,
            attention_multiplier=0.1,
            logits_scaling=2.0,
        )
    if name == "phi3":
        rotary_pairs = 6  # partial_rotary_factor 0.75 of head_dim 16
        return Phi3Config(
            **{**_TINY_SHAPE, "max_position_embeddings": 4096},
            num_hidden_layers=2,
            tie_word_embeddings=False,
            partial_rotary_factor=0.75,
            original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(rotary_pairs)],
                "long_factor": [1.0 + 3.0 * i for i in range(rotary_pairs)],
            },
        )
    if name == "glm4":
        return Glm4Config(
            **_TINY_SHAPE, num_hidden_layers=2, tie_word_embeddings=False, partial_rotary_factor=0.5
        )
    if name == "llama32":
        return LlamaConfig(
            **_TINY_SHAPE,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            rope_theta=500000.0,
        )
    if name == "mistral":
        return MistralConfig(
            **_TINY_SHAPE, num_hidden_layers=2, tie_word_embeddings=False, sliding_window=WINDOW
        )
    if name in ("qwen2_window", "qwen3_window"):  # layer 0 attends fully, layer 1 within the window
        return (Qwen2Config if name == "qwen2_window" else Qwen3Config)(
            **_TINY_SHAPE,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        )
    raise KeyError(name)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory, smollm2_path):
    """``family_model(name)`` -> the directory of that family's tiny random-weight model (built on first use)."""
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = save_tiny_model(family_config(name), tmp_path_factory.mktemp(name), smollm2_path)
        return built[name]

    return get


@pytest.fixture(scope="session")
def family_reference(family_model):
    """``family_reference(name)`` -> a :class:`GreedyReference` of transformers on that tiny model."""
    loaded: dict[str, GreedyReference] = {}

    def get(name: str) -> GreedyReference:
        if name not in loaded:
            loaded[name] = GreedyReference(_hf_model(family_model(name)))
        return loaded[name]

    return get


def check_exact(engine, reference, lists: list[list[int]]) -> list[dict]:
    outs = engine.generate(input_ids=lists, sampling_params=GREEDY)
    for ids, out in zip(lists, outs, strict=True):
        assert out["output_ids"] == reference(ids, NEW), f"mismatch for a {len(ids)}-token prompt"
    return outs


def family_prompts(tokenizer) -> list[list[int]]:
    """1, 5, 61 and 236 tokens: Phi-3's LongRoPE takes its short factors for the first two sequences throughout
    and its long factors for the others. (A sequence that crosses the original context while decoding is not
    compared: transformers then recomputes its whole cache with the long factors, the engine keeps the keys it
    has; see ``RotaryEmbedding.cos_sin_for``.)"""
    lists = [tokenizer.encode(PROMPTS[i]) for i in (0, 1, 6, 14)]
    assert (
        max(len(ids) for ids in lists[:2]) + NEW <= PHI3_ORIGINAL_CONTEXT < min(len(ids) for ids in lists[2:])
    )
    return lists


@pytest.mark.parametrize("name", ["olmo2", "granite", "phi3", "glm4", "llama32"])
def test_family_greedy_matches_transformers(name, family_model, family_reference):
    with sgl_ray.Engine(family_model(name), max_total_tokens=4096) as engine:
        lists = family_prompts(engine.tokenizer)
        ref = family_reference(name)
        check_exact(engine, ref, lists[:1])  # alone
        check_exact(engine, ref, lists)  # together: mixed prefill and decode batches


def test_sliding_window_changes_the_reference(family_model):
    """The window matters on these weights: transformers' logits with it differ from full attention exactly
    from the first position whose window leaves out a key (otherwise the tests below would prove nothing)."""
    model = _hf_model(family_model("mistral"))
    ids = torch.arange(100, 100 + 2 * WINDOW).unsqueeze(0)
    with torch.no_grad():
        windowed = model(ids).logits[0]
        model.config.sliding_window = None
        full = model(ids).logits[0]
    torch.testing.assert_close(windowed[:WINDOW], full[:WINDOW], rtol=0, atol=0)
    assert (windowed[WINDOW:] - full[WINDOW:]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize(
    ("name", "windows"),
    [("mistral", [WINDOW, WINDOW]), ("qwen2_window", [None, WINDOW]), ("qwen3_window", [None, WINDOW])],
)
def test_sliding_window_matches_transformers(name, windows, family_model, family_reference):
    """Prompts of 40 to 236 tokens (beyond the 16-token window) in prefill chunks of 7 tokens, so chunks attend to
    KV of earlier chunks partly outside the window; then two prompts whose 48-token shared prefix comes from the
    cache, the new tokens' windows reaching into it."""
    with sgl_ray.Engine(family_model(name), chunked_prefill_size=7, max_total_tokens=4096) as engine:
        model = engine._core.runner.model.model
        assert [layer.self_attn.attn.sliding_window for layer in model.layers] == windows
        tok = engine.tokenizer
        ref = family_reference(name)
        lists = [tok.encode(PROMPTS[i]) for i in (6, 14)] + [tok.encode(PROMPTS[3] + PROMPTS[8] + PROMPTS[9])]
        assert min(len(ids) for ids in lists) > 2 * WINDOW
        check_exact(engine, ref, lists)
        prefix = tok.encode(SHARED_PREFIX)
        shared = [prefix + tok.encode(q) for q in (" Q: Who wrote Hamlet? A:", " Q: Largest ocean? A:")]
        check_exact(engine, ref, shared[:1])
        again = check_exact(engine, ref, shared)
        assert all(o["meta_info"]["cached_tokens"] >= len(prefix) - 1 > 2 * WINDOW for o in again)


def test_window_lets_go_of_kv_past_the_pool(family_model, family_reference):
    """Mistral (every layer windowed) in a 96-slot pool: two requests of 61 and 15 prompt tokens plus 100 new
    ones each are token-exact (with ``disable_hybrid_swa_memory``, keeping the KV their windows have left, both
    outgrow the pool and are aborted); a follow-up turn (prompt + answer + more) reuses the live tail of the
    first from the prefix cache, through the tombstones of its head, and is exact too; nothing leaks."""
    new = 100
    params = {**GREEDY, "max_new_tokens": new}
    with sgl_ray.Engine(
        family_model("mistral"), chunked_prefill_size=7, max_total_tokens=96, page_size=4
    ) as engine:
        tok, ref = engine.tokenizer, family_reference("mistral")
        kv = engine._core.scheduler.kv
        assert kv.window == WINDOW and kv.capacity == 96
        lists = [tok.encode(PROMPTS[6]), tok.encode(PROMPTS[5])]
        assert all(len(ids) + new > kv.capacity for ids in lists)
        outs = engine.generate(input_ids=lists, sampling_params=params)
        for ids, out in zip(lists, outs, strict=True):
            assert out["output_ids"] == ref(ids, new)
        turn = lists[0] + outs[0]["output_ids"] + tok.encode(" And then?")
        again = engine.generate(input_ids=turn, sampling_params=params)
        assert again["output_ids"] == ref(turn, new)
        assert again["meta_info"]["cached_tokens"] >= len(lists[0]) + new - 2 * WINDOW
        kv.cache.check()
        assert kv.cache.protected_size == 0
        assert kv.allocator.num_free_slots + kv.cache.evictable_size == kv.capacity
    with sgl_ray.Engine(
        family_model("mistral"),
        chunked_prefill_size=7,
        max_total_tokens=96,
        page_size=4,
        disable_hybrid_swa_memory=True,
    ) as engine:
        assert engine._core.scheduler.kv.window is None
        outs = engine.generate(input_ids=lists, sampling_params=params)
        assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["abort", "abort"]
