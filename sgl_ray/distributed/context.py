"""What one model shard knows about its place in the parallel layout (tensor, pipeline and expert parallelism)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from sgl_ray.distributed.communicator import Communicator, SingleProcessCommunicator


class PipelineChannel(ABC):
    """Hands activations from one pipeline stage to the next.

    Contract: stage s calls ``send`` exactly when stage s + 1 calls ``recv`` with the same shapes and dtype, once
    per step, in plan order.
    """

    @abstractmethod
    def send(self, tensors: list[torch.Tensor]) -> None: ...

    @abstractmethod
    def recv(
        self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class ShardContext:
    """Tensor-parallel group of this shard plus its pipeline stage (``pipe`` is None for a single stage).

    ``ep_size`` splits the tensor-parallel group into that many expert-parallel groups for MoE layers (each holds
    ``num_experts / ep_size`` experts; see ``sgl_ray.layers.moe.experts.ExpertPlacement``)."""

    tp: Communicator = field(default_factory=SingleProcessCommunicator)
    pp_rank: int = 0
    pp_size: int = 1
    pipe: PipelineChannel | None = None
    ep_size: int = 1
    moe_a2a_backend: str = (
        "none"  # how MoE layers move tokens to their experts (see sgl_ray.layers.moe.dispatch)
    )

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """Layers ``[start, end)`` of this stage: an even split, earlier stages taking the remainder.

        Example::

            >>> ShardContext(pp_rank=1, pp_size=3).layer_range(10)
            (4, 7)
        """
        if self.pp_size > num_layers:
            raise ValueError(f"pipeline size {self.pp_size} exceeds the number of layers ({num_layers})")
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return start, start + base + (1 if self.pp_rank < extra else 0)
