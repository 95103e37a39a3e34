"""The engine with an FP8 KV cache (``kv_cache_dtype``) on CPU (fp32) against transformers on the same weights.

FP8 keys and values change the numbers, so the reference is transformers with its attention reading keys and values
rounded exactly as the pool stores them (``quantize_kv`` with the layer's scales, then times the scale: the
``fp8_kv_sdpa`` attention function registered below); against it the engine's greedy tokens are equal and their
logprobs within ``LOGPROB_TOL`` (measured: 3e-6, fp32 summation order). Against plain transformers (full-precision
keys and values) the first token agrees where plain transformers' top-2 margin is clear, the logprobs differ by
more than ``LOGPROB_TOL`` (the pool really holds FP8) and less than ``FP8_DRIFT``. Token comparisons stop at the
first step whose reference top-2 margin is below ``MIN_MARGIN`` (a near tie that rounding may decide), and each
prompt must compare at least ``MIN_COMPARED`` tokens, so none of this can pass vacuously.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import sgl_ray
from sgl_ray.mem_cache.kv_pool import KVScale, dequantize_kv, quantize_kv

NEW = 8
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
LOGPROB_TOL = 1e-3  # against the FP8-rounded reference
FP8_DRIFT = {
    "fp8_e4m3": 0.3,
    "fp8_e5m2": 0.6,
}  # first-token logprob against full precision (measured 0.12, 0.38)
MIN_MARGIN = 1e-3
MIN_COMPARED = 4
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_g = torch.Generator().manual_seed(3)
PROMPTS = [torch.randint(3, 49152, (n,), generator=_g).tolist() for n in (4, 17, 70)]
# written into a copy of the tiny Llama (float32, as read back) in two of the conventions of
# sgl_ray.mem_cache.kv_scales
CHECKPOINT_SCALES = {
    layer: KVScale(*(float(torch.tensor(x)) for x in scale))
    for layer, scale in {0: (0.37, 0.21), 1: (0.05, 2.5)}.items()
}


def _fp8_kv_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention on keys and values rounded as an FP8 pool holds them (``module.fp8_kv``:
    (dtype, KVScale), or None for full precision)."""
    spec = getattr(module, "fp8_kv", None)
    if spec is not None:
        dtype, scale = spec
        key = dequantize_kv(quantize_kv(key, scale.k, dtype), scale.k, key.dtype)
        value = dequantize_kv(quantize_kv(value, scale.v, dtype), scale.v, value.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("sgl_ray_fp8_kv_sdpa", _fp8_kv_sdpa)


class Reference:
    """Greedy tokens, their logprobs and the top-2 margins from transformers, with keys and values rounded as
    ``set_kv`` of a ``kv_cache_dtype`` pool with ``scales`` rounds them (``kv_cache_dtype=None``: full precision)."""

    def __init__(self, path: str) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sgl_ray_fp8_kv_sdpa"
        ).eval()

    def _round_kv(self, kv_cache_dtype: str | None, scales: dict[int, KVScale] | None) -> None:
        for i, layer in enumerate(self.model.model.layers):
            spec = (FP8[kv_cache_dtype], (scales or {}).get(i, KVScale())) if kv_cache_dtype else None
            layer.self_attn.fp8_kv = spec

    def score(
        self, ids: list[int], tokens: list[int], kv_cache_dtype: str | None
    ) -> tuple[list[float], list[float]]:
        """Teacher-forced on ``ids + tokens``: each token's logprob, and the best logprob at its step."""
        self._round_kv(kv_cache_dtype, None)
        with torch.no_grad():
            logits = self.model(torch.tensor([ids + tokens]), logits_to_keep=len(tokens) + 1).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)  # [len(tokens), vocab]
        return logp[torch.arange(len(tokens)), tokens].tolist(), logp.amax(dim=-1).tolist()

    def __call__(
        self, ids: list[int], kv_cache_dtype: str | None, scales: dict[int, KVScale] | None = None
    ) -> tuple[list[int], list[float], list[float]]:
        self._round_kv(kv_cache_dtype, scales)
        tokens, logprobs, margins = [], [], []
        step, cache = torch.tensor([ids]), None  # the cache holds full-precision K/V: rounded at every read
        with torch.no_grad():
            for _ in range(NEW):
                out = self.model(step, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                top = torch.log_softmax(out.logits[0, -1].float(), dim=-1).topk(2)
                logprobs.append(top.values[0].item())
                margins.append((top.values[0] - top.values[1]).item())
                tokens.append(int(top.indices[0]))
                step = torch.tensor([[tokens[-1]]])
        return tokens, logprobs, margins


@pytest.fixture(scope="module")
def reference(tiny_llama_path) -> Reference:
    return Reference(tiny_llama_path)


@pytest.fixture(scope="module")
def scaled_llama_path(tiny_llama_path, tmp_path_factory) -> str:
    """The tiny Llama with per-layer KV-cache scales in its checkpoint: layer 0 as compressed-tensors writes them
    (``self_attn.k_scale``), layer 1 as ModelOpt does (``self_attn.k_proj.k_scale``)."""
    path = tmp_path_factory.mktemp("llama_kv_scales")
    for f in Path(tiny_llama_path).iterdir():
        shutil.copy(f, path / f.name)
    tensors = load_file(path / "model.safetensors")
    names = {
        0: ("self_attn.k_scale", "self_attn.v_scale"),
        1: ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
    }
    for layer, scale in CHECKPOINT_SCALES.items():
        k_name, v_name = names[layer]
        tensors[f"model.layers.{layer}.{k_name}"] = torch.tensor(scale.k)
        tensors[f"model.layers.{layer}.{v_name}"] = torch.tensor([scale.v])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


def _engine(path: str, kv_cache_dtype: str, **kwargs) -> sgl_ray.Engine:
    return sgl_ray.Engine(
        path,
        kv_cache_dtype=kv_cache_dtype,
        device="cpu",
        skip_tokenizer_init=True,
        max_total_tokens=1024,
        **kwargs,
    )


def _compared(margins: list[float]) -> int:
    """How many leading tokens to compare: up to and including the first near tie's step."""
    for i, margin in enumerate(margins):
        if margin < MIN_MARGIN:
            return i + 1
    return len(margins)


def _check(out: dict, expected: tuple[list[int], list[float], list[float]]) -> None:
    tokens, logprobs, margins = expected
    n = _compared(margins)
    assert n >= MIN_COMPARED, f"the reference has a near tie at step {n}: pick other prompts"
    got = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
    assert out["output_ids"][:n] == tokens[:n]
    assert got[:n] == pytest.approx(logprobs[:n], abs=LOGPROB_TOL)


@pytest.mark.parametrize("kv_cache_dtype", list(FP8))
def test_greedy_matches_transformers_on_fp8_keys_and_values(kv_cache_dtype, tiny_llama_path, reference):
    with _engine(tiny_llama_path, kv_cache_dtype) as engine:
        assert engine._core.runner.kv_pool.dtype == FP8[kv_cache_dtype]
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    drift = []
    for ids, out in zip(PROMPTS, outs, strict=True):
        _check(out, reference(ids, kv_cache_dtype))
        tokens, logprobs, margins = reference(ids, None)  # full precision
        got = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
        if margins[0] > 2 * FP8_DRIFT[kv_cache_dtype]:
            assert out["output_ids"][0] == tokens[0]
        assert abs(got[0] - logprobs[0]) < FP8_DRIFT[kv_cache_dtype]
        n = next((i for i, (a, b) in enumerate(zip(out["output_ids"], tokens, strict=True)) if a != b), NEW)
        drift += [abs(a - b) for a, b in zip(got[:n], logprobs[:n], strict=True)]
    assert max(drift) > 10 * LOGPROB_TOL, "the FP8 pool gave full-precision results: is it quantizing?"


def test_checkpoint_scales_are_loaded_and_applied(scaled_llama_path, reference):
    with _engine(scaled_llama_path, "fp8_e4m3") as engine:
        assert engine._core.runner.kv_pool.scales == [CHECKPOINT_SCALES[0], CHECKPOINT_SCALES[1]]
        outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    differs = False
    for ids, out in zip(PROMPTS, outs, strict=True):
        expected = reference(ids, "fp8_e4m3", CHECKPOINT_SCALES)
        _check(out, expected)
        unit = reference(ids, "fp8_e4m3")  # the same pool with scales 1.0
        n = _compared(expected[2])
        differs |= any(
            abs(a - b) > 10 * LOGPROB_TOL for a, b in zip(expected[1][:n], unit[1][:n], strict=True)
        )
    assert differs, "the checkpoint's scales change nothing here: the test would not see them ignored"
    # kv_cache_dtype="auto" keeps the model's dtype and ignores the scales
    with _engine(scaled_llama_path, "auto") as engine:
        pool = engine._core.runner.kv_pool
        assert pool.dtype == torch.float32 and pool.scales == [KVScale()] * 2


def test_prefix_cache_hits_on_an_fp8_pool(tiny_llama_path, reference):
    """A request whose prefix was stored by an earlier one (and one prefilled in chunks of 16 over it) reads it
    from the FP8 pool: the tokens and logprobs of a cold run."""
    prefix = PROMPTS[2]
    prompts = [prefix + PROMPTS[0], prefix + PROMPTS[1]]
    with _engine(tiny_llama_path, "fp8_e4m3", chunked_prefill_size=16) as engine:
        first = engine.generate(input_ids=prompts[0], sampling_params=GREEDY, return_logprob=True)
        assert first["meta_info"]["cached_tokens"] == 0
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    assert outs[0]["meta_info"]["cached_tokens"] == len(prompts[0]) - 1
    assert outs[1]["meta_info"]["cached_tokens"] >= len(prefix)
    for ids, out in zip([prompts[0], *prompts], [first, *outs], strict=True):
        _check(out, reference(ids, "fp8_e4m3"))


def test_token_capacity_doubles_in_the_same_memory(tiny_llama_path):
    """bf16 model: under the same ``mem_fraction_static`` an FP8 pool holds twice the tokens in the same bytes."""
    stats, nbytes = {}, {}
    for kv in ("auto", "fp8_e4m3"):
        with sgl_ray.Engine(
            tiny_llama_path, kv_cache_dtype=kv, dtype="bfloat16", device="cpu", skip_tokenizer_init=True,
            mem_fraction_static=2e-5,
        ) as engine:  # fmt: skip
            stats[kv] = engine.get_stats()["kv_capacity"]
            nbytes[kv] = engine._core.runner.kv_pool.nbytes
    assert stats["auto"] > 500
    assert stats["fp8_e4m3"] in (2 * stats["auto"], 2 * stats["auto"] + 1)
    assert abs(nbytes["fp8_e4m3"] - nbytes["auto"]) <= 2 * nbytes["auto"] // stats["auto"]
