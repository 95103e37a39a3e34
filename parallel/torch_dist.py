"""torch.distributed implementations of the core's communicator and pipeline-channel interfaces."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from sgl_ray.distributed import Communicator, PipelineChannel, ShardContext
from sgl_ray.parallel.layout import ParallelLayout


class TorchDistCommunicator(Communicator):
    """Collectives over one torch.distributed process group (ranks listed in global order)."""

    def __init__(self, group: dist.ProcessGroup | None, ranks: list[int], global_rank: int) -> None:
        self.group = group
        self.ranks = ranks
        self._rank = ranks.index(global_rank)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        out = torch.empty_like(tensor)
        dist.all_to_all_single(out, tensor.contiguous(), group=self.group)
        return out


class TorchDistPipe(PipelineChannel):
    """Point-to-point activation hand-off between neighbouring pipeline stages (same tp rank)."""

    def __init__(self, prev_rank: int | None, next_rank: int | None) -> None:
        self.prev_rank = prev_rank
        self.next_rank = next_rank

    def send(self, tensors: list[torch.Tensor]) -> None:
        assert self.next_rank is not None
        for t in tensors:
            dist.send(t.contiguous(), dst=self.next_rank)

    def recv(
        self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        assert self.prev_rank is not None
        out = []
        for shape in shapes:
            buf = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buf, src=self.prev_rank)
            out.append(buf)
        return out


def init_shard_context(
    layout: ParallelLayout, rank: int, master_addr: str, master_port: int, device: torch.device
) -> ShardContext:
    """Join the group (every shard calls this with its own rank) and build its tensor/pipeline context.

    Every rank creates every subgroup, in the same order, as torch.distributed requires.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=layout.world_size,
        timeout=timedelta(minutes=5),
    )
    tp_rank, pp_rank = layout.coords(rank)
    tp = None
    for ranks in layout.tp_groups():
        group = dist.new_group(ranks) if layout.tp_size > 1 else None
        if rank in ranks:
            tp = TorchDistCommunicator(group, ranks, rank)
    assert tp is not None
    pipe = None
    if layout.pp_size > 1:
        prev_rank = rank - layout.tp_size if pp_rank > 0 else None
        next_rank = rank + layout.tp_size if pp_rank < layout.pp_size - 1 else None
        pipe = TorchDistPipe(prev_rank, next_rank)
    return ShardContext(tp=tp, pp_rank=pp_rank, pp_size=layout.pp_size, pipe=pipe, ep_size=layout.ep_size)
