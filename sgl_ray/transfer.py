"""Host-to-device copies that never wait for the device's queue."""

from __future__ import annotations

import numpy as np
import torch


def to_device(host: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``. On CUDA through pinned memory: a copy from pageable memory first waits for the
    stream, i.e. for the step in flight, and overlap scheduling would be lost. Read-only arrays (as Ray
    deserialises them) are copied first."""
    if isinstance(host, np.ndarray):
        host = np.ascontiguousarray(host)
        host = torch.from_numpy(host if host.flags.writeable else host.copy())
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
