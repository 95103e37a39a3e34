"""``bench quant-accuracy`` on a tiny random Llama (SmolLM2's tokenizer): the engine's teacher-forced distributions
against transformers on the same weights, and each format's KL against transformers on the weights it holds."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from sgl_ray.bench.quant_accuracy import QuantAccuracyConfig, format_results, make_prompts, run_quant_accuracy
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.layers.quantization.int4_formats import int4_from_float
from sgl_ray.model_loader import load_tokenizer, resolve_model

CFG = QuantAccuracyConfig(formats=("fp8", "awq", "fp8_e4m3"), num_prompts=3, max_tokens=12)


def _hf_logprobs(model, prompts):
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1) for p in prompts]


def test_kl_per_format_against_transformers(tiny_llama_path):
    run, results = run_quant_accuracy(EngineArgs(model_path=tiny_llama_path, dtype="float32"), CFG)
    by = {r.format: r for r in results}
    assert list(by) == ["reference", "fp8", "awq", "fp8_e4m3"]
    assert by["reference"].mean_kl == 0.0 and by["reference"].top1_agreement == 1.0
    assert by["fp8"].skipped and "CUDA" in by["fp8"].note  # W8A8 is CUDA-only
    assert by["awq"].quantization == "awq" and by["fp8_e4m3"].kv_cache_dtype == "fp8_e4m3"
    assert by["awq"].weight_bytes < by["reference"].weight_bytes  # (mostly the embeddings here)
    record = run.record("quant-accuracy", {}, **vars(by["awq"]))
    assert record["model"] == tiny_llama_path and record["mean_kl"] == by["awq"].mean_kl

    # the same prompts through transformers: on the float weights, and on what AWQ at load holds
    prompts = make_prompts(CFG, load_tokenizer(resolve_model(tiny_llama_path)), 0)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    ref = _hf_logprobs(hf, prompts)
    nll = sum(
        -float(r[:-1].gather(1, torch.tensor(p[1:])[:, None]).sum())
        for r, p in zip(ref, prompts, strict=True)
    )
    assert abs(by["reference"].nll - nll / sum(len(p) - 1 for p in prompts)) < 1e-4
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    for method in ("awq",):
        for name, w in state.items():
            if name.endswith("proj.weight"):
                hf.get_parameter(name).data.copy_(int4_from_float(w, method).dequantize())
        kl = torch.cat(
            [(r.exp() * (r - q)).sum(-1) for r, q in zip(ref, _hf_logprobs(hf, prompts), strict=True)]
        )
        got = by[method]
        assert got.positions == kl.numel() and got.mean_kl > 0
        assert abs(got.mean_kl - float(kl.mean())) < 1e-4 + 1e-3 * float(kl.mean())
        assert abs(got.max_kl - float(kl.max())) < 1e-4 + 1e-3 * float(kl.max())
    kv = by["fp8_e4m3"]
    assert 0 < kv.mean_kl < by["awq"].mean_kl and 0 < kv.top1_agreement <= 1.0
    table = format_results(results)
    assert "| awq | awq | auto |" in table and "skipped: W8A8" in table
