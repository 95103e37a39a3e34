"""Multi-head latent attention on CPU: the torch MLA backend (absorbed decode, up-projected extend) and the Triton
split-KV decode under Triton's interpreter, both against attention written out with the latents up-projected
(``tests/gpu/test_mla_attention.py``, whose GPU tests run the same checks natively); the pool sizing by latent
bytes; DeepSeek's softmax scale under YaRN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config, LlamaConfig
from transformers.modeling_rope_utils import yarn_apply_mscale

from sgl_ray.attention import create_attention_backend
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.errors import InvalidRequestError
from sgl_ray.models.deepseek_attention import mla_softmax_scale

from ..gpu.test_mla_attention import Dims, check, make_case, ragged_lens

CASES = {
    # decode rows between extends with and without a cached prefix (a prefix-cache hit's extend)
    "mixed": ([30, 0, 100, 10, 3, 0], [1, 5, 1, 70, 1, 1], Dims()),
    "decode-ragged": (ragged_lens(12, 1, 300, seed=1) - 1, np.ones(12, dtype=np.int64), Dims()),
    "extend-after-prefix": ([64, 17], [9, 40], Dims(heads=2)),
    # latent and rope widths that are no powers of two, more heads than one Triton head block
    "odd-widths": ([30, 5, 100, 0], [1, 1, 1, 3], Dims(heads=20, nope=8, rope=24, v=8, lora=48)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend(case):
    prefix, ext, dims = CASES[case]
    check(make_case(prefix, ext, dims, torch.float32, device="cpu", seed=len(prefix)), "torch")


_TRITON = """
import torch
from tests.gpu.test_mla_attention import Dims, check, make_case
# decode rows among extends, 8 splits (the reduce; splits past the short requests' ends), latent and rope widths
# that are no powers of two, two head blocks of 16
odd = Dims(heads=20, nope=8, rope=24, v=8, lora=48)
check(make_case([30, 0, 100, 10, 3], [1, 5, 1, 70, 1], odd, torch.float32, device="cpu", seed=1), "triton", 8)
# fp16, one split per request (stage 1 writes the output itself)
check(make_case([300, 0, 64, 7], [1, 1, 1, 1], Dims(), torch.float16, device="cpu", seed=3), "triton", 1)
"""


def test_triton_decode_in_the_interpreter(triton_interpreter):
    error = triton_interpreter.run(_TRITON)
    assert not error, error[-3000:]


def test_kv_bytes_per_token_count_the_latent():
    """DeepSeek-V3 in bf16: 61 layers x (512 + 64) values x 2 bytes, the same on every tensor-parallel rank;
    a dense model of the same heads would hold 2 x 128 heads x 128 values per layer (57x more)."""
    v3 = ModelConfig(DeepseekV3Config(), torch.bfloat16)
    assert v3.kv_latent_dim == 576
    assert v3.kv_bytes_per_token() == v3.kv_bytes_per_token(tp_size=8) == 61 * 576 * 2
    dense = ModelConfig(
        LlamaConfig(num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, head_dim=128),
        torch.bfloat16,
    )
    assert dense.kv_latent_dim == 0
    assert dense.kv_bytes_per_token() == 61 * 2 * 128 * 128 * 2


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
         "original_max_position_embeddings": 4096},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0,
         "original_max_position_embeddings": 4096},
    ],
)  # fmt: skip
def test_softmax_scale_matches_transformers(rope):
    config = DeepseekV2Config(rope_parameters=rope)
    expected = yarn_apply_mscale(config.rope_parameters, 192**-0.5)
    ours = mla_softmax_scale(ModelConfig(config, torch.float32).rope_parameters, 192)
    assert ours == pytest.approx(expected)


def test_mla_models_take_an_mla_backend():
    assert type(create_attention_backend(None, torch.device("cpu"), mla=True)).__name__ == "TorchMLABackend"
    with pytest.raises(InvalidRequestError, match="for MLA models"):
        create_attention_backend("flashinfer", torch.device("cpu"), mla=True)
