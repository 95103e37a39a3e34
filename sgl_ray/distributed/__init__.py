"""Parallel-group interfaces the core depends on (implementations across actors live in ``sgl_ray.parallel``)."""

from sgl_ray.distributed.communicator import Communicator, SingleProcessCommunicator

__all__ = ["Communicator", "SingleProcessCommunicator"]
