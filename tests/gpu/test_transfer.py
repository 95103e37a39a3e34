"""Host-to-device copies through the pinned ring: right values while the device is busy, spans reused only after
their copies, read-only and empty arrays. Run on the device machine (``pytest -m gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgl_ray.transfer import PinnedRing, to_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_ring_copies_stay_correct_while_the_device_is_busy_and_the_ring_wraps() -> None:
    dev = torch.device("cuda")
    ring = PinnedRing(dev, nbytes=64 * 1024)  # small: the copies below wrap it many times
    a = torch.randn(4096, 4096, device=dev)
    rng = np.random.default_rng(0)
    hosts, outs = [], []
    for i in range(200):
        if i % 20 == 0:
            a = a @ a / 64  # keep the stream busy so that copies queue up behind it
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 100)))
        host = rng.integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int64).astype(
            rng.choice(["int32", "int64"])
        )
        hosts.append(host.copy())
        outs.append(ring.copy(host))
        host[...] = 0  # the caller may reuse its array at once: the ring copied it
    torch.cuda.synchronize()
    for host, out in zip(hosts, outs, strict=True):
        assert out.device.type == "cuda" and np.array_equal(out.cpu().numpy(), host)
    assert ring.waits > 0  # spans were waited for before reuse, not overwritten


def test_to_device_takes_read_only_bool_and_empty_arrays() -> None:
    dev = torch.device("cuda")
    ro = np.arange(10, dtype=np.int64)
    ro.flags.writeable = False
    assert to_device(ro, dev).tolist() == list(range(10))
    flags = np.array([True, False, True])
    assert to_device(flags, dev).tolist() == [True, False, True]
    assert to_device(np.zeros((0, 3), dtype=np.int32), dev).shape == (0, 3)
    big = np.ones(8 * 2**20, dtype=np.int32)  # over a quarter of the ring: pinned on its own
    assert int(to_device(big, dev).sum()) == len(big)
    assert to_device(torch.tensor([1.5]), dev).item() == 1.5
