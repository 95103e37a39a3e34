"""Hybrid KV pools (``mem_cache.hybrid_swa``) with CUDA decode graphs on the Triton backend: models mixing
full-attention and windowed layers split their KV into a full pool and a smaller windowed one while decode steps
replay graphs whose windowed layers read their slots through the runner's ``full_to_swa`` map (updated between
replays). Greedy tokens equal the same engine with one shared pool and with eager decode steps, over prompts several
windows long and decode steps across pages while the windowed pool runs full and its pages are recycled. Run on the
device machine (``pytest -m gpu``); skipped where there is no GPU. Token-id prompts: no tokenizer there."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

WINDOW = 32
NEW = 48  # twelve pages of 4 tokens per request
_SHAPE = dict(
    hidden_size=512,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_hidden_layers=4,
    vocab_size=32000,
    max_position_embeddings=4096,
    initializer_range=0.1,  # peaked logits: greedy is not decided by rounding
)
# A small budget (the pools run full) in pages of 4, prefill chunks shorter than the longer prompts, few graphs.
_OPTS = dict(
    skip_tokenizer_init=True,
    page_size=4,
    max_total_tokens=256,
    swa_full_tokens_ratio=0.25,
    chunked_prefill_size=32,
    cuda_graph_max_bs=8,
)


def _config(name: str):
    from transformers import Gemma3TextConfig, GptOssConfig, Qwen2Config

    if name == "gemma3":  # local and global layers, each with its own rope; sandwich norms
        return Gemma3TextConfig(
            **_SHAPE,
            head_dim=64,
            intermediate_size=1024,
            tie_word_embeddings=False,  # tied, the embedding (times sqrt(hidden)) decides the greedy token alone
            layer_types=["sliding_attention", "full_attention"] * 2,
            sliding_window=WINDOW,
            query_pre_attn_scalar=64,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        )
    if name == "gpt_oss":  # sinks, experts; plain attention (rotary and the KV store fused on CUDA)
        return GptOssConfig(
            **_SHAPE,
            head_dim=64,
            intermediate_size=256,
            tie_word_embeddings=False,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
    if name == "qwen2":  # layer 0 attends fully, the others within the window; plain Llama layers
        return Qwen2Config(
            **_SHAPE,
            intermediate_size=1024,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        )
    raise KeyError(name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``model_dir(name)`` -> a directory with that family's random fp32 weights (built on first use); Gemma's
    norms, which scale by ``1 + weight``, with weights from N(0, 0.5) (transformers sets them to 0)."""
    from transformers import AutoModelForCausalLM

    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_config(name), dtype=torch.float32)
            if name == "gemma3":
                with torch.no_grad():
                    for key, param in model.named_parameters():
                        if key.endswith("norm.weight"):
                            param.normal_(0.0, 0.5)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            made[name] = str(path)
        return made[name]

    return get


def _prompts(lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(10, 32000, (n,), generator=g).tolist() for n in lengths]


def _run(path: str, prompts: list[list[int]], **kw) -> tuple[list[dict], dict]:
    """Greedy outputs, and what the engine's runner and scheduler did."""
    import sgl_ray

    with sgl_ray.Engine(path, **_OPTS, **kw) as engine:
        outs = engine.generate(
            input_ids=prompts,
            sampling_params={"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True},
            return_logprob=True,
        )
        runner, kv = engine._core.runner, engine._core.scheduler.kv
        graphs = runner.cuda_graphs
        facts = dict(
            hybrid=runner.full_to_swa is not None and kv.slot_map is not None,
            replays=graphs.num_replays if graphs is not None else 0,
            capacity=kv.capacity,
            swa_capacity=kv.swa_capacity,
            peak_held=kv.peak_held,
            peak_swa_held=kv.peak_swa_held,
        )
    return outs, facts


def _assert_same(expected: list[dict], got: list[dict], tol: float, what: str) -> None:
    for e, g in zip(expected, got, strict=True):
        assert g["output_ids"] == e["output_ids"], what
        lps_e = [lp for lp, _ in e["meta_info"]["output_token_logprobs"]]
        lps_g = [lp for lp, _ in g["meta_info"]["output_token_logprobs"]]
        assert lps_g == pytest.approx(lps_e, abs=tol), what


@pytest.mark.parametrize("name", ["gemma3", "gpt_oss"])
def test_hybrid_pools_with_graphs_match_one_pool_and_eager(model_dir, name):
    """fp32: six prompts of 9 to 150 tokens (up to five windows) and 48 new tokens each, hybrid pools with decode
    graphs = one shared pool with graphs = hybrid pools decoding eagerly, token for token."""
    path, prompts = model_dir(name), _prompts((45, 150, 9, 100, 70, 33))
    runs = {
        "hybrid, graphs": _run(path, prompts, dtype="float32"),
        "one pool, graphs": _run(path, prompts, dtype="float32", disable_hybrid_swa_memory=True),
        "hybrid, eager": _run(path, prompts, dtype="float32", disable_cuda_graph=True),
    }
    outs, facts = runs["hybrid, graphs"]
    assert facts["hybrid"] and facts["replays"] > 0, facts  # split pools, decode steps replayed
    assert facts["swa_capacity"] < facts["capacity"], facts
    # more full KV was held at once than the windowed pool holds: windowed pages were let go of and reused
    assert facts["peak_swa_held"] <= facts["swa_capacity"] < facts["peak_held"], facts
    assert not runs["one pool, graphs"][1]["hybrid"] and runs["one pool, graphs"][1]["replays"] > 0
    assert runs["hybrid, eager"][1]["hybrid"] and runs["hybrid, eager"][1]["replays"] == 0
    for key in ("one pool, graphs", "hybrid, eager"):
        _assert_same(runs[key][0], outs, 1e-2, key)


@pytest.mark.parametrize("name", ["qwen2", "gpt_oss"])
def test_one_row_fused_store_with_hybrid_pools(model_dir, name, monkeypatch):
    """bf16, one request at a time: its decode steps (one row) replay graphs in which the QKV GEMV rotates q and k
    and stores k and v itself, a windowed layer at its slot of the windowed pool; the same tokens as one pool."""
    from sgl_ray.models.llama_attention import LlamaAttention

    stores = []  # per fused store traced (graph captures included): whether its layer's KV is in the SWA pool
    store_args = LlamaAttention.store_args
    monkeypatch.setattr(
        LlamaAttention,
        "store_args",
        lambda self, cos_sin, batch: (
            stores.append(batch.uses_swa_pool(self.attn)) or store_args(self, cos_sin, batch)
        ),
    )
    path = model_dir(name)
    prompts = _prompts((150, 70))
    runs = {}
    for hybrid in (True, False):
        outs, facts = [], {}
        stores.clear()
        for ids in prompts:  # alone: every decode step has one row
            out, facts = _run(path, [ids], dtype="bfloat16", disable_hybrid_swa_memory=not hybrid)
            outs += out
        assert facts["hybrid"] == hybrid and facts["replays"] > 0, facts
        assert any(stores) == hybrid and not all(stores), (
            f"fused KV stores traced (True: into the windowed pool): {sorted(set(stores))}"
        )
        runs[hybrid] = outs
    _assert_same(runs[False], runs[True], 0.05, "one pool")
