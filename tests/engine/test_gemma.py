"""Gemma 2 and Gemma 3 text models in-process (CPU, fp32): greedy tokens and logprobs equal transformers' on the
same tiny random weights — sandwich norms scaling by ``1 + weight`` (set to random values here: transformers
initialises them to 0), embeddings times sqrt(hidden), GELU-tanh MLP, ``query_pre_attn_scalar``, local/global
layers with prompts several windows long in prefill chunks and through a prefix-cache hit, Gemma 2's attention and
final soft caps, Gemma 3's q/k norms and its local layers' own rope base next to the global layers' scaled rope;
and the built-in chat template of a Gemma tokenizer without one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, PretrainedConfig

import sgl_ray
from sgl_ray.errors import InvalidRequestError
from sgl_ray.model_loader import load_tokenizer, resolve_model
from sgl_ray.protocol.chat_template import render_chat

from ..conftest import _TINY_SHAPE, GreedyReference, _hf_model
from .prompts import PROMPTS, SHARED_PREFIX
from .test_dense_families import GREEDY, NEW, check_exact

WINDOW = 16


def gemma_config(name: str) -> PretrainedConfig:
    """The shared tiny shape (head_dim 16, SmolLM2's vocabulary) with each family's quirks at values that matter:
    ``query_pre_attn_scalar`` unlike head_dim, caps that bend the scores and logits of these weights."""
    if name == "gemma2":  # local, global, local; untied (greedy tokens vary more than with a tied head)
        return Gemma2Config(
            **_TINY_SHAPE,
            num_hidden_layers=3,
            tie_word_embeddings=False,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=5.0,
            architectures=["Gemma2ForCausalLM"],
        )
    if name == "gemma3":  # tied, as every Gemma 3; global layers with linear rope scaling
        return Gemma3TextConfig(
            **_TINY_SHAPE,
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            architectures=["Gemma3ForCausalLM"],
        )
    raise KeyError(name)


def save_gemma(config: PretrainedConfig, directory: Path, tokenizer) -> str:
    """Random fp32 weights, every norm's weight drawn from N(0, 0.5), with SmolLM2's tokenizer (which has no
    template for the built-in one to replace: it keeps its own)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory, smollm2_path):
    """``gemma_model(name)`` -> the directory of that family's tiny random-weight model (built on first use)."""
    tokenizer = load_tokenizer(resolve_model(smollm2_path))
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = save_gemma(gemma_config(name), tmp_path_factory.mktemp(name), tokenizer)
        return built[name]

    return get


@pytest.fixture(scope="module")
def gemma_reference(gemma_model):
    loaded: dict[str, GreedyReference] = {}

    def get(name: str) -> GreedyReference:
        if name not in loaded:
            loaded[name] = GreedyReference(_hf_model(gemma_model(name)))
        return loaded[name]

    return get


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:  # [1, T] -> [T, vocab]
    with torch.no_grad():
        return model(ids).logits[0]


@contextmanager
def _patched(*changes: tuple[object, str, object]) -> Iterator[None]:
    """Set ``(object, attribute, value)`` for the block, then restore the attributes."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    for obj, name, value in changes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def test_the_quirks_change_the_reference(gemma_reference):
    """On these weights transformers' logits change with the window (exactly from the first position whose window
    leaves a key out), Gemma 2's attention and final caps, and Gemma 3's local rope base: the tests below would
    notice an engine that ignored one of them."""
    ids = torch.arange(100, 100 + 2 * WINDOW).unsqueeze(0)
    for name in ("gemma2", "gemma3"):
        model = gemma_reference(name).model
        base = _logits(model, ids)
        with _patched((model.config, "sliding_window", 10_000)):
            full = _logits(model, ids)
        torch.testing.assert_close(base[:WINDOW], full[:WINDOW], rtol=0, atol=0)
        assert (base[WINDOW:] - full[WINDOW:]).abs().amax(-1).min() > 1e-3
    gemma2 = gemma_reference("gemma2").model
    base = _logits(gemma2, ids)
    uncapped = [(layer.self_attn, "attn_logit_softcapping", None) for layer in gemma2.model.layers]
    for changes in (uncapped, [(gemma2.config, "final_logit_softcapping", None)]):
        with _patched(*changes):
            assert (_logits(gemma2, ids) - base).abs().amax() > 0.1
    gemma3 = gemma_reference("gemma3").model
    rotary = gemma3.model.rotary_emb
    base = _logits(gemma3, ids)
    with _patched((rotary, "sliding_attention_inv_freq", rotary.full_attention_inv_freq)):
        assert (_logits(gemma3, ids) - base).abs().amax() > 0.1


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_greedy_matches_transformers(name, gemma_model, gemma_reference):
    """Prompts of 1 to 236 tokens (up to 15 windows) alone and batched, in prefill chunks of 7 tokens that attend
    to KV of earlier chunks partly outside the window; then two prompts whose 48-token shared prefix comes from
    the cache; and the logprobs of a prompt's greedy tokens (the final cap shapes them)."""
    with sgl_ray.Engine(gemma_model(name), chunked_prefill_size=7, max_total_tokens=4096) as engine:
        layers = engine._core.runner.model.model.layers
        windows = [layer.self_attn.attn.sliding_window for layer in layers]
        assert windows == [WINDOW, None, WINDOW, None][: len(layers)]
        tok, ref = engine.tokenizer, gemma_reference(name)
        lists = [tok.encode(PROMPTS[i]) for i in (0, 6, 14)] + [tok.encode(PROMPTS[3] + PROMPTS[8])]
        assert max(len(ids) for ids in lists) > 10 * WINDOW
        check_exact(engine, ref, lists[:1])
        check_exact(engine, ref, lists)
        prefix = tok.encode(SHARED_PREFIX)
        shared = [prefix + tok.encode(q) for q in (" Q: Who wrote Hamlet? A:", " Q: Largest ocean? A:")]
        check_exact(engine, ref, shared[:1])
        again = check_exact(engine, ref, shared)
        assert all(o["meta_info"]["cached_tokens"] >= len(prefix) - 1 > 2 * WINDOW for o in again)

        ids = lists[1]
        out = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
        full = torch.tensor([ids + out["output_ids"]])
        logp = torch.log_softmax(_logits(ref.model, full), dim=-1)  # [T, vocab]
        for i, (lp, token) in enumerate(out["meta_info"]["output_token_logprobs"]):
            assert lp == pytest.approx(logp[len(ids) - 1 + i, token].item(), abs=1e-4)
        assert len(out["output_ids"]) == NEW


def test_builtin_gemma_chat_template(gemma_model, tmp_path):
    """A Gemma tokenizer without a chat template gets Gemma's turn format; one with a template keeps it."""
    source = resolve_model(gemma_model("gemma2"))
    assert "<|im_start|>" in load_tokenizer(source).chat_template  # SmolLM2's own, kept
    bare = load_tokenizer(source)
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((Path(source.local_dir) / "config.json").read_text())
    tokenizer = load_tokenizer(resolve_model(str(tmp_path), weights=False))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi! "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    text = tokenizer.decode(render_chat(tokenizer, messages))
    assert text == (
        f"{tokenizer.bos_token}<start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    with pytest.raises(InvalidRequestError, match="tool role"):
        render_chat(tokenizer, [{"role": "tool", "content": "42"}])


def test_hybrid_pools_run_more_requests_and_stay_exact(gemma_model, gemma_reference):
    """Gemma 2 (two of three layers windowed) with a 128-token budget: split into a full pool and an SWA pool of
    a quarter of its tokens, three requests of 61, 15 and 61 prompt tokens plus 40 new ones run at once (keeping
    every layer's KV, the same budget holds fewer), token-exact; a follow-up turn hits the cache; both pools'
    accounting returns to its start."""
    new = 40
    params = {**GREEDY, "max_new_tokens": new}
    opts = {"chunked_prefill_size": 7, "max_total_tokens": 128, "page_size": 4, "swa_full_tokens_ratio": 0.25}
    tok, ref = None, gemma_reference("gemma2")
    peaks = {}
    for hybrid in (True, False):
        with sgl_ray.Engine(gemma_model("gemma2"), disable_hybrid_swa_memory=not hybrid, **opts) as engine:
            tok = engine.tokenizer
            kv = engine._core.scheduler.kv
            lists = [tok.encode(PROMPTS[6]), tok.encode(PROMPTS[5]), tok.encode(PROMPTS[6] + " Again")]
            outs = engine.generate(input_ids=lists, sampling_params=params)
            for ids, out in zip(lists, outs, strict=True):
                assert out["output_ids"] == ref(ids, new)
            peaks[hybrid] = kv.peak_running
            if not hybrid:
                assert kv.slot_map is None and kv.capacity == 128
                continue
            assert kv.capacity == 256 and kv.swa_capacity == 64 and kv.window == WINDOW
            assert kv.peak_swa_held <= kv.swa_capacity and kv.peak_held > kv.swa_capacity
            turn = lists[0] + outs[0]["output_ids"] + tok.encode(" And then?")
            again = engine.generate(input_ids=turn, sampling_params=params)
            assert again["output_ids"] == ref(turn, new)
            assert again["meta_info"]["cached_tokens"] >= len(lists[0]) + new - 2 * WINDOW
            stats = engine._core.stats()
            assert stats["kv_swa_capacity"] == 64
            cache = kv.cache
            cache.check()
            assert cache.protected_size == 0 and cache.swa_protected_size == 0
            assert kv.allocator.num_free_slots + cache.evictable_size == kv.capacity
            assert kv.slot_map.swa.num_free_slots + cache.swa_evictable_size == kv.swa_capacity
            assert engine.flush_cache()
            assert kv.allocator.num_free_slots == kv.capacity
            assert kv.slot_map.swa.num_free_slots == kv.swa_capacity
    assert peaks[True] > peaks[False], peaks
