"""Ray actors: ``ShardWorker`` (one model shard per device), ``GlobalScheduler`` (queue, policy, radix tree and
page-allocator metadata; drives the shards), and the driver-side cores that ``sgl_ray.Engine`` uses when
``tp_size``/``pp_size``/``dp_size`` > 1 or ``use_ray=True``."""

from __future__ import annotations

from sgl_ray.actors.ray_core import DataParallelCore, RayEngineCore
from sgl_ray.actors.scheduler_actor import GlobalScheduler
from sgl_ray.actors.shard_group import ShardGroup
from sgl_ray.actors.shard_worker import ShardWorker
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.entrypoints.core import EngineCore


def create_engine_core(args: EngineArgs, model_config: ModelConfig) -> EngineCore:
    """The core behind ``sgl_ray.Engine(..., tp_size=…, pp_size=…, dp_size=…)``.

    Example::

        >>> llm = sgl_ray.Engine(model_path, tp_size=2, pp_size=2)  # doctest: +SKIP
    """
    return DataParallelCore(args) if args.dp_size > 1 else RayEngineCore(args)


__all__ = [
    "DataParallelCore",
    "GlobalScheduler",
    "RayEngineCore",
    "ShardGroup",
    "ShardWorker",
    "create_engine_core",
]
