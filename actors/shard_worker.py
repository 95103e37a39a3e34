"""``ShardWorker``: one model shard (its layers, its slice of every tensor-parallel layer, its KV pool, attention
backend and sampler) in one Ray actor, one per GPU or per CPU slot."""

from __future__ import annotations

import logging
import os

import torch

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig, resolve_dtype
from sgl_ray.model_loader import iter_weights, load_hf_config, resolve_model
from sgl_ray.parallel import ParallelLayout, free_port, init_shard_context, node_ip
from sgl_ray.runner.memory import KVCapacity
from sgl_ray.runner.model_runner import ModelRunner, RunnerInfo
from sgl_ray.scheduler.plan import StepOutput, StepPlan

logger = logging.getLogger(__name__)


class ShardWorker:
    """Lifecycle: ``rendezvous_address`` (rank 0 only) → ``setup`` on every rank (joins the torch.distributed
    group, loads weights, proposes a KV capacity) → ``init_memory`` with the group's agreed capacity →
    ``execute`` once per step.

    Example (what :class:`~sgl_ray.actors.shard_group.ShardGroup` does)::

        >>> worker = ray.remote(ShardWorker).remote(rank=0, layout=ParallelLayout())  # doctest: +SKIP
    """

    def __init__(self, rank: int, layout: ParallelLayout) -> None:
        self.rank = rank
        self.layout = layout
        self.runner: ModelRunner | None = None

    def rendezvous_address(self) -> tuple[str, int]:
        return node_ip(), free_port()

    def setup(self, args: EngineArgs, master: tuple[str, int]) -> KVCapacity:
        device = args.torch_device()
        if device.type == "cuda":
            device = torch.device("cuda", 0)  # Ray exposes this actor's GPU as device 0
            args = args.replace(device="cuda:0")
        elif args.num_threads is None:
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        shard = init_shard_context(self.layout, self.rank, master[0], master[1], device)
        source = resolve_model(args.model_path, revision=args.revision, weights=args.load_format != "dummy")
        hf_config = load_hf_config(source)
        config = ModelConfig(hf_config, resolve_dtype(args.dtype, hf_config, device), args.context_length)
        self.runner = ModelRunner(args, config, iter_weights(source), shard=shard, allocate=False)
        return self.runner.plan_capacity()

    def init_memory(self, capacity: KVCapacity) -> RunnerInfo:
        assert self.runner is not None
        return self.runner.init_memory(capacity)

    def execute(self, plan: StepPlan) -> StepOutput:
        assert self.runner is not None
        return self.runner.execute(plan)

    def ping(self) -> int:
        return self.rank
