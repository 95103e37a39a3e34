"""Multi-LoRA: PEFT adapters served batched, each request with its own adapter or none.

- :mod:`~sgl_ray.lora.adapter`: reading and checking PEFT adapter directories.
- :mod:`~sgl_ray.lora.pool`: the scheduler side, which adapter sits in which runner slot (LRU, pinning).
- :mod:`~sgl_ray.lora.weights` and :mod:`~sgl_ray.lora.layers`: the runner side, slot buffers inside wrappers of the
  tensor-parallel projections.
- :mod:`~sgl_ray.lora.backend` (torch) and :mod:`~sgl_ray.lora.triton_backend` (CUDA): the batched computation.
"""

from __future__ import annotations

from sgl_ray.lora.adapter import AdapterConfig, check_adapter, parse_lora_paths, read_adapter_config
from sgl_ray.lora.backend import LoRABackend, LoRABatch, TorchLoRABackend, create_lora_backend
from sgl_ray.lora.pool import AdapterPool

__all__ = [
    "AdapterConfig",
    "AdapterPool",
    "LoRABackend",
    "LoRABatch",
    "TorchLoRABackend",
    "check_adapter",
    "create_lora_backend",
    "parse_lora_paths",
    "read_adapter_config",
]
