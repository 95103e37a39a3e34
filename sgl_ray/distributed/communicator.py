"""The communicator seam: the few collectives tensor-parallel layers need.

The engine core talks only to this interface, so it never imports Ray. A single process uses
:class:`SingleProcessCommunicator` (every collective is the identity); ``sgl_ray.parallel`` provides implementations
across Ray actors (torch.distributed with NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Communicator(ABC):
    """A group of ``world_size`` ranks; this object is rank ``rank``.

    Contract: every rank of the group calls each collective in the same order with tensors of the same shape and
    dtype; ``all_reduce`` sums in place and returns its argument; ``all_gather`` concatenates along ``dim`` in rank
    order.
    """

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def world_size(self) -> int: ...

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor: ...

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` [world_size, ...]: row ``d`` goes to rank ``d``; returns [world_size, ...] whose row ``s`` came
        from rank ``s`` (equal sizes, no host synchronisation: safe inside CUDA graphs)."""
        raise NotImplementedError(f"{type(self).__name__} has no all_to_all")


class SingleProcessCommunicator(Communicator):
    """The group of one: every collective is the identity."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor
