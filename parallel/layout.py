"""How tensor- and pipeline-parallel ranks are numbered."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    """``world = tp_size * pp_size`` shards; global rank ``r = pp_rank * tp_size + tp_rank``.

    ::

        pp stage 0: ranks 0 .. tp-1        (embedding, first layers)
        pp stage 1: ranks tp .. 2tp-1
        ...
        last stage: samples; its tp rank 0 (``output_rank``) answers the scheduler

    Example::

        >>> ParallelLayout(tp_size=2, pp_size=2).tp_groups()
        [[0, 1], [2, 3]]
    """

    tp_size: int = 1
    pp_size: int = 1
    ep_size: int = 1  # expert-parallel groups within each tensor-parallel group (MoE layers)

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError("tp_size and pp_size must be >= 1")
        if self.ep_size < 1 or self.tp_size % self.ep_size:
            raise ValueError(f"ep_size ({self.ep_size}) must divide tp_size ({self.tp_size})")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def coords(self, rank: int) -> tuple[int, int]:
        """``(tp_rank, pp_rank)`` of a global rank."""
        return rank % self.tp_size, rank // self.tp_size

    def tp_groups(self) -> list[list[int]]:
        return [[p * self.tp_size + t for t in range(self.tp_size)] for p in range(self.pp_size)]

    def pp_groups(self) -> list[list[int]]:
        return [[p * self.tp_size + t for p in range(self.pp_size)] for t in range(self.tp_size)]

    @property
    def output_rank(self) -> int:
        return (self.pp_size - 1) * self.tp_size
