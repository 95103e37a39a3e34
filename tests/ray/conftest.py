"""One local Ray cluster for the whole test session (started on first use)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local cluster with 8 logical CPUs (shard actors take one each; the machine may have fewer cores)."""
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
