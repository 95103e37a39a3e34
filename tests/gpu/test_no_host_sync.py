"""The sampling step never waits for the device: under ``torch.cuda.set_sync_debug_mode("error")`` any
synchronising call (``.item()``, a blocking copy, ``nonzero``) raises. A wait there would stall the CPU until the
forward pass in flight ends and undo overlap scheduling; a constrained step once lost a third of its speed to one
table copied from pageable memory per call. Run on the device machine (``pytest -m gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgl_ray.constrained.base import bitmask_width
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.sampling.sampler import Sampler
from sgl_ray.sampling.state import Admission, SamplingState
from sgl_ray.transfer import to_device

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
