"""The engine on CUDA (bf16) with an FP8 KV cache: greedy output against transformers in fp32 with keys and values
rounded as the pool stores them (``tests/engine/test_kv_fp8_engine.py``'s reference), with the Triton and FlashInfer
backends, CUDA graphs on and off, and the pool's capacity. Run on the device machine (``pytest -m gpu``).

On CUDA the one-row fusions that store K/V from inside the QKV GEMV or the rotary kernel (``fused_linear``,
``LlamaAttention.rotate_store_attend``) write the model's dtype, so they stand aside for an FP8 pool (their guard:
``kv_pool.dtype == x.dtype``); ``test_fused_store_is_off_for_fp8`` checks that they do.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import sgl_ray

from ..engine.test_kv_fp8_engine import FP8, Reference
from .backends import ATTENTION_BACKENDS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW = 8
# Logprob tolerance against the fp32 reference. bf16 keys and values differ from fp32 ones by ~2^-8 relative, which
# moves about 1 in 16 of them (e4m3) across an FP8 rounding boundary the reference does not cross: measured with the
# torch backend in bf16 on CPU for this model, 0.19 (e4m3) and 0.17 (e5m2) at most, 0.05 with a bf16 pool.
TOL = 0.4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A small random Llama (GQA 8/4 heads of 64, 3 layers) in bf16."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        max_position_embeddings=2048,
        initializer_range=0.05,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_fp8_kv")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(model_dir) -> Reference:
    return Reference(model_dir)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(10, 4096, (n,), generator=g).tolist() for n in (5, 40, 300)]


def _engine(path: str, kv_cache_dtype: str, **kwargs) -> sgl_ray.Engine:
    return sgl_ray.Engine(
        path, kv_cache_dtype=kv_cache_dtype, dtype="bfloat16", skip_tokenizer_init=True, **kwargs
    )


def _generate(engine) -> list[dict]:
    greedy = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
    return engine.generate(input_ids=_prompts(), sampling_params=greedy, return_logprob=True)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("kv_cache_dtype", list(FP8))
def test_greedy_against_transformers(backend, kv_cache_dtype, model_dir, reference):
    """Teacher-forced on the engine's own tokens (so a near tie that bf16 decides differently cannot derail the
    comparison): at every step the engine's token is the reference's best up to ``TOL`` and its logprob the
    reference's within ``TOL``; where the reference's choice is clear (margin above ``2 * TOL``) the tokens are
    equal outright."""
    with _engine(model_dir, kv_cache_dtype, attention_backend=backend) as engine:
        assert engine._core.runner.kv_pool.dtype == FP8[kv_cache_dtype]
        assert engine._core.runner.cuda_graphs is not None  # decode steps replay graphs over the FP8 pool
        outs = _generate(engine)
    for ids, out in zip(_prompts(), outs, strict=True):
        tokens = out["output_ids"]
        got = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
        logprobs, best = reference.score(ids, tokens, kv_cache_dtype)
        assert got == pytest.approx(logprobs, abs=TOL), f"{len(ids)}-token prompt"
        assert all(b - lp < TOL for b, lp in zip(best, logprobs, strict=True)), f"{len(ids)}-token prompt"
        expected, _, margins = reference(ids, kv_cache_dtype)
        assert tokens[0] == expected[0] or margins[0] < 2 * TOL


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_graphs_and_eager_decode_agree(backend, model_dir):
    """Decode steps replayed from CUDA graphs over the FP8 pool give eager decode's logprobs (split counts may
    differ: the sums' order only), up to the first token a near tie decides differently."""
    outs = []
    for disable in (False, True):
        with _engine(model_dir, "fp8_e4m3", attention_backend=backend, disable_cuda_graph=disable) as engine:
            outs.append(_generate(engine))
    for graph, eager in zip(*outs, strict=True):
        a, b = graph["output_ids"], eager["output_ids"]
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), NEW)
        assert n >= 2
        lp_graph = [lp for lp, _ in graph["meta_info"]["output_token_logprobs"]][:n]
        lp_eager = [lp for lp, _ in eager["meta_info"]["output_token_logprobs"]][:n]
        assert lp_graph == pytest.approx(lp_eager, abs=0.05)


def test_fused_store_is_off_for_fp8(model_dir):
    """The one-row CUDA fusion that writes K/V from the QKV GEMV's epilogue does not take a step over an FP8 pool
    (it would store unscaled values into it); over a bf16 pool it does."""

    def fuses(kv: str) -> bool:  # in a function of its own: no local keeps one engine's runner past its end
        with _engine(model_dir, kv) as engine:
            runner = engine._core.runner
            attn = runner.model.model.layers[0].self_attn
            x = torch.randn(1, 512, dtype=torch.bfloat16, device="cuda")
            return attn.fuses_rotary_store(x, SimpleNamespace(kv_pool=runner.kv_pool))

    assert fuses("auto") is True
    assert fuses("fp8_e4m3") is False


def test_token_capacity_doubles(model_dir):
    capacity = {}
    for kv in ("auto", "fp8_e5m2"):
        with _engine(model_dir, kv, mem_fraction_static=0.5) as engine:
            capacity[kv] = engine.get_stats()["kv_capacity"]
    assert capacity["fp8_e5m2"] == pytest.approx(2 * capacity["auto"], rel=0.02)
