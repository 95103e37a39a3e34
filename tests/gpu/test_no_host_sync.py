"""The sampler, and the engine's whole steps, never wait for the device: under
``torch.cuda.set_sync_debug_mode("error")`` any synchronising call (``.item()``, a blocking copy, ``nonzero``)
raises. A wait there stalls the CPU until the forward pass in flight ends and undoes overlap scheduling; a
constrained step once lost a third of its speed to one table copied from pageable memory per call. Run on the
device machine (``pytest -m gpu``)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sgl_ray.constrained.base import bitmask_width
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.sampling.sampler import Sampler
from sgl_ray.sampling.state import Admission, SamplingState
from sgl_ray.transfer import to_device

from .backends import ATTENTION_BACKENDS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 1000

PARAMS = {
    "greedy": SamplingParams(temperature=0.0),
    "top-p": SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05),
    "penalties": SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.5),
}


@pytest.mark.parametrize("masked", [False, True], ids=["free", "masked"])
@pytest.mark.parametrize("kind", list(PARAMS))
def test_sampling_step_makes_no_host_sync(kind: str, masked: bool) -> None:
    dev = torch.device("cuda")
    state = SamplingState(max_reqs=8, vocab_size=VOCAB, device=dev)
    slots = np.array([1, 3, 4])
    state.set_requests([Admission(int(s), PARAMS[kind], 7 + int(s), (2,), (5, 6, 7), (8,)) for s in slots])
    sampler = Sampler()
    logits = torch.randn(len(slots), VOCAB, device=dev)
    host_mask = np.random.default_rng(0).integers(
        0, 2**31 - 1, (len(slots), bitmask_width(VOCAB)), dtype=np.int32
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            mask = to_device(host_mask, dev) if masked else None
            out = sampler.sample(
                logits,
                torch.from_numpy(slots),
                to_device(np.full(len(slots), 10 + step), dev),
                state,
                return_logprobs=True,
                vocab_mask=mask,
                slots_dev=to_device(slots, dev),
            )
            state.update(to_device(slots, dev), out.next_token_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.next_token_ids.shape == (len(slots),)
    if masked:  # every token sampled is one the mask allows
        ids = out.next_token_ids.cpu().numpy()
        words = host_mask[np.arange(len(slots)), ids // 32]
        assert ((words >> (ids % 32)) & 1).all()


class _NoSync:
    """Within: every synchronising CUDA call in the process raises (the engine thread's too, which fails the
    requests with the error's message). Waiting on a step's event is not such a call."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> str:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("nosync_llama")
    LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=2048,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sync"])
def test_engine_steps_make_no_host_sync(small_llama, overlap: bool, backend: str) -> None:
    """Whole steps (prefill, decode graph replays, sampling with every kind of parameter, logprobs) after
    warm-up: the engine thread waits only on each step's event."""
    import sgl_ray

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (int(n),), generator=g).tolist() for n in (4, 40, 130, 9)]
    params = [
        {"temperature": 0.0, "max_new_tokens": 12},
        {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 1, "max_new_tokens": 12},
        {
            "temperature": 1.0,
            "repetition_penalty": 1.3,
            "frequency_penalty": 0.2,
            "seed": 2,
            "max_new_tokens": 12,
        },
        {"temperature": 0.0, "min_new_tokens": 4, "stop_token_ids": [7], "max_new_tokens": 12},
    ]
    kwargs = dict(load_format="dummy", skip_tokenizer_init=True, device="cuda", attention_backend=backend)
    kwargs["dtype"] = "bfloat16" if backend == "flashinfer" else "float32"  # FlashInfer: fp16/bf16 only
    with sgl_ray.Engine(
        small_llama, disable_overlap_schedule=not overlap, max_total_tokens=4096, **kwargs
    ) as eng:
        eng.generate(input_ids=prompts, sampling_params=params)  # warm-up: kernels compiled, graphs captured
        with _NoSync():
            outs = eng.generate(
                input_ids=prompts, sampling_params=params, return_logprob=True, top_logprobs_num=2
            )
    assert all(len(o["output_ids"]) > 0 for o in outs)


@pytest.mark.parametrize("jump", [False, True], ids=["step", "jump"])
def test_constrained_steps_make_no_host_sync(tmp_path, jump: bool) -> None:
    """Constrained requests (deferred masks under overlap; with jump-forward, its extend and verification rows)."""
    import sgl_ray

    from .test_gpu_structured import REGEX, SCHEMA, make_model

    model = make_model(tmp_path)
    greedy = {"temperature": 0.0, "max_new_tokens": 48}
    params = [{**greedy, "json_schema": json.dumps(SCHEMA)}] * 3 + [{**greedy, "regex": REGEX}] * 3
    prompts = [f"Item {i}: write it as JSON." for i in range(len(params))]
    with sgl_ray.Engine(
        model, device="cuda", dtype="float32", max_total_tokens=8192, disable_jump_forward=not jump
    ) as eng:
        eng.generate(prompts, params)
        with _NoSync():
            outs = eng.generate(prompts, params)
    assert all(re.fullmatch(REGEX, o["text"]) for o in outs[3:])
