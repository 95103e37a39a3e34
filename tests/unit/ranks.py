"""A tensor-parallel group member for tests that only build and load layers: it has a rank and a size, and fails
the test if asked to communicate."""

from __future__ import annotations

from sgl_ray.distributed import Communicator


class RankOf(Communicator):
    """Rank ``rank`` of a group of ``size`` that is never asked to communicate (construction and loading only)."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._size

    def all_reduce(self, tensor):
        raise AssertionError("no collectives here")

    def all_gather(self, tensor, dim=-1):
        raise AssertionError("no collectives here")
