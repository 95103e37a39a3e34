"""INT4 and FP8 on CUDA (run on the device: ``pytest -m gpu tests/quantization``; skipped without a GPU).

The kernels against the float weights their test-written checkpoints mean, in bf16 and fp16 (the same checks run on
small shapes under the interpreter: tests/unit/test_quant_triton_interpreter.py), and the engine in bf16 on AWQ,
GPTQ, FP8 block and online-FP8 checkpoints of a Llama-shaped model against transformers (bf16) on the dequantized
weights: the first greedy tokens equal, logprobs within ``TOL``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sgl_ray.layers.quantization import QuantizedWeight

from .kernel_checks import check_fp8, check_int4, check_int4_row_range
from .packing import (
    awq_tensors,
    fp8_blocks,
    fp8_online_reference,
    gptq_tensors,
    quantize_int4,
    write_quantized,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HALF = [torch.bfloat16, torch.float16]
FIRST = 4  # greedy tokens that must match transformers' (bf16 on both sides, different GEMMs)
TOL = 0.15  # logprob tolerance, as tests/gpu/test_gpu_engine.py: bf16 rounding of logits of magnitude ~20


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(
    torch.cuda.is_available() and not _fp8_capable(), reason="FP8 needs compute capability 8.9 or more"
)


@pytest.mark.parametrize("dtype", HALF)
def test_int4_kernels_on_cuda(dtype):
    check_int4("cuda", dtype, rows_list=(1, 2, 4, 5, 16, 33, 257), n=1000, k=4096)
    check_int4_row_range("cuda", dtype)


@needs_fp8
@pytest.mark.parametrize("dtype", HALF)
def test_fp8_kernels_on_cuda(dtype):
    check_fp8("cuda", dtype, rows_list=(1, 2, 4, 5, 16, 33, 257), n=1000, k=4096)


# --- the engine on CUDA ------------------------------------------------------------------------------------------


def _awq(w):
    gq = quantize_int4(w, 128)
    return awq_tensors(gq), gq.dequantized()


def _gptq(w):
    gq = quantize_int4(w, 128, sym=True, act_order_seed=w.shape[0])
    return gptq_tensors(gq, v1=True), gq.dequantized()


AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
FP8_BLOCK_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
CASES = {  # name -> (quantize, quantization_config, option, needs FP8)
    "awq": (_awq, AWQ_CONFIG, None, False),
    "gptq-act-order": (_gptq, GPTQ_CONFIG, None, False),
    "fp8-blocks": (lambda w: fp8_blocks(w, 128), FP8_BLOCK_CONFIG, None, True),
    "online-fp8": (lambda w: ({"weight": w}, fp8_online_reference(w)), None, "fp8", True),
}


@pytest.fixture(scope="module")
def float_llama():
    """A random Llama-shaped model (GQA 16/8 heads, head_dim 64; as tests/gpu/test_gpu_engine.py), fp32 weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        initializer_range=0.1,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return json.loads(config.to_json_string()), dict(model.state_dict())


@pytest.mark.parametrize("name", list(CASES))
def test_engine_on_cuda_matches_transformers(name, float_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    import sgl_ray

    quantize, quant_config, option, fp8 = CASES[name]
    if fp8 and not _fp8_capable():
        pytest.skip("FP8 needs compute capability 8.9 or more")
    config, state = float_llama
    reference = write_quantized(state, config, tmp_path / "quantized", quantize, quant_config)
    (tmp_path / "float").mkdir()
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in reference.items()}
    save_file(bf16, tmp_path / "float" / "model.safetensors")
    (tmp_path / "float" / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.bfloat16).cuda().eval()
    prompts = [[1, 450, 7483, 310, 3444, 338], list(range(100, 400, 3))]
    with sgl_ray.Engine(
        str(tmp_path / "quantized"), quantization=option, dtype="bfloat16", skip_tokenizer_init=True,
        max_total_tokens=4096,
    ) as engine:  # fmt: skip
        outs = engine.generate(
            input_ids=prompts,
            sampling_params={"temperature": 0.0, "max_new_tokens": FIRST, "ignore_eos": True},
            return_logprob=True,
        )
        held = [m for m in engine._core.runner.model.modules() if isinstance(m, QuantizedWeight)]
        ratio = sum(w.nbytes for w in held) / sum(2 * w.rows * w.cols for w in held)  # vs the same in bf16
        assert len(held) == 16 and ratio < (0.52 if fp8 else 0.27), ratio
    for ids, out in zip(prompts, outs, strict=True):
        seq = torch.tensor([ids + out["output_ids"]], device="cuda")
        with torch.no_grad():
            logp = torch.log_softmax(hf(seq).logits[0].float(), dim=-1)
        want = logp[len(ids) - 1 : -1].argmax(dim=-1).tolist()
        assert out["output_ids"] == want, f"{name}: a {len(ids)}-token prompt"
        for i, (lp, tok) in enumerate(out["meta_info"]["output_token_logprobs"]):
            assert lp == pytest.approx(logp[len(ids) - 1 + i, tok].item(), abs=TOL)
