"""MoE families in-process (torch experts, CPU, fp32): greedy tokens equal transformers' on the same tiny random
weights with concurrent mixed-length requests, 16-token prefill chunks and prefix-cache hits; the expert-load
statistics count every computed token's routed pairs."""

from __future__ import annotations

import pytest

import sgl_ray

from ..moe_models import MOE_MODELS, moe_config
from .prompts import PROMPTS, SHARED_PREFIX

NEW = 10
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


def token_lists(tokenizer) -> list[list[int]]:
    """Eight prompts of 1 to ~200 tokens, then two that share a few-shot prefix."""
    prefix = tokenizer.encode(SHARED_PREFIX)
    shared = [prefix + tokenizer.encode(q) for q in (" Q: Who wrote Hamlet? A:", " Q: Largest ocean? A:")]
    return [tokenizer.encode(p) for p in PROMPTS[6:14]] + shared


def check_exact(engine, reference, lists: list[list[int]]) -> list[dict]:
    outs = engine.generate(input_ids=lists, sampling_params=GREEDY)
    for ids, out in zip(lists, outs, strict=True):
        assert out["output_ids"] == reference(ids, NEW), f"mismatch for a {len(ids)}-token prompt"
    return outs


def computed_tokens(outs: list[dict]) -> int:
    """Tokens that went through the model: prompt tokens not served from the cache, and every generated token
    but the last (sampled, never fed back)."""
    return sum(
        o["meta_info"]["prompt_tokens"]
        - o["meta_info"]["cached_tokens"]
        + o["meta_info"]["completion_tokens"]
        - 1
        for o in outs
    )


def check_expert_load(stats: dict, name: str, tokens: int) -> None:
    cfg = moe_config(name)
    top_k = cfg.num_experts_per_tok
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    load = stats["expert_tokens"]
    assert sorted(load, key=int) == [str(i) for i in range(cfg.num_hidden_layers) if i not in dense]
    for counts in load.values():
        assert sum(counts) == tokens * top_k
        assert sum(c > 0 for c in counts) >= 2  # random routers spread the tokens


@pytest.mark.parametrize("name", MOE_MODELS)
def test_moe_greedy_matches_transformers(name, moe_model, moe_reference):
    with sgl_ray.Engine(moe_model(name), chunked_prefill_size=16, max_total_tokens=4096) as engine:
        lists = token_lists(engine.tokenizer)
        ref = moe_reference(name)
        first = check_exact(engine, ref, lists)
        again = check_exact(engine, ref, lists[-2:])  # the shared few-shot prefix is cached now
        assert all(o["meta_info"]["cached_tokens"] >= len(lists[-1]) // 2 for o in again)
        check_expert_load(engine.get_stats(), name, computed_tokens(first + again))


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_norm_scales_folded_into_moe_layers(name, moe_model, tmp_path, monkeypatch):
    """``fold_norm_weights`` (done on CUDA at load, where one-row steps then run each norm inside the GEMVs
    around it) keeps an MoE model: random norm scales moved into the QKV weights and the dense layers' gate/up
    (MoE blocks keep their norm's scale), those norms set to 1, give transformers' greedy tokens on the unfolded
    model (fp32, CPU). Qwen3-MoE mixes a dense layer in; Qwen2-MoE has shared experts."""
    import torch

    from sgl_ray.model_loader import load_tokenizer, resolve_model
    from sgl_ray.runner import model_runner

    from ..conftest import GreedyReference, _hf_model

    hf = _hf_model(moe_model(name))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in hf.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + 0.4 * (torch.rand(norm.weight.shape, generator=g) - 0.5))
    hf.save_pretrained(tmp_path)
    load_tokenizer(resolve_model(moe_model(name))).save_pretrained(tmp_path)
    monkeypatch.setattr(model_runner, "fold_norms_if_supported", lambda model, *_: model.fold_norm_weights())
    with sgl_ray.Engine(str(tmp_path), max_total_tokens=4096) as engine:
        model = engine._core.runner.model.model
        assert model.norms_folded
        for layer in model.layers:  # folded into dense MLPs; an MoE block keeps its norm's scale
            moe = type(layer.mlp).__name__ == "SparseMoeBlock"
            assert bool((layer.input_layernorm.weight == 1).all())
            assert bool((layer.post_attention_layernorm.weight == 1).all()) != moe
            assert layer.mlp_folds_norm != moe
        check_exact(engine, GreedyReference(hf), token_lists(engine.tokenizer)[:4])
