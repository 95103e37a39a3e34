"""Parallel groups across Ray actors: torch.distributed communicators (NCCL on GPU, gloo on CPU) that implement
the core's :class:`~sgl_ray.distributed.Communicator` and :class:`~sgl_ray.distributed.PipelineChannel`, the
rank layout of tensor × pipeline parallelism, and rendezvous helpers."""

from sgl_ray.parallel.layout import ParallelLayout
from sgl_ray.parallel.rendezvous import free_port, node_ip
from sgl_ray.parallel.torch_dist import TorchDistCommunicator, TorchDistPipe, init_shard_context

__all__ = [
    "ParallelLayout",
    "TorchDistCommunicator",
    "TorchDistPipe",
    "free_port",
    "init_shard_context",
    "node_ip",
]
