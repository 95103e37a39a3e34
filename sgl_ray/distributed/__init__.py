"""Parallel-group interfaces the core depends on (implementations across actors live in ``sgl_ray.parallel``)."""

from sgl_ray.distributed.communicator import Communicator, SingleProcessCommunicator
from sgl_ray.distributed.context import PipelineChannel, ShardContext

__all__ = ["Communicator", "PipelineChannel", "ShardContext", "SingleProcessCommunicator"]
