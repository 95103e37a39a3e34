"""An engine whose shards the Ray cluster can never hold fails at once, one the cluster is too busy for fails after
``placement_timeout`` naming what holds the resources, and a Ray address where nothing answers fails (or, when only
``ray start``'s record names it, is skipped) in seconds (issue 33, item 3). The session's cluster has 8 logical CPUs.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

import sgl_ray
from sgl_ray.actors.cluster import cluster_to_join
from sgl_ray.errors import InsufficientResourcesError, RayClusterUnreachableError, ResourcesBusyError

from ..conftest import free_port

pytestmark = pytest.mark.ray


def _pending_groups() -> list[str]:
    return [pg for pg, info in placement_group_table().items() if info["state"] == "PENDING"]


def test_a_layout_the_cluster_can_never_hold_fails_at_once(ray_cluster, smollm2_path):
    t0 = time.monotonic()
    with pytest.raises(InsufficientResourcesError) as info:
        sgl_ray.Engine(smollm2_path, tp_size=3, pp_size=3, device="cpu")  # 9 shards, 8 CPUs
    assert time.monotonic() - t0 < 20
    message = str(info.value)
    assert "9 placement-group bundles of {CPU: 1}" in message
    assert "tp_size 3 × pp_size 3 × dp_size 1" in message
    assert "8 CPUs in total" in message and "room for 8" in message
    assert "`ray start --head --num-cpus 9`" in message and "`ray.init(num_cpus=9)`" in message
    assert not _pending_groups()


def test_a_busy_cluster_is_waited_for_then_named(ray_cluster, tiny_llama_path):
    free = math.floor(ray.available_resources().get("CPU", 0.0))
    blocker = placement_group([{"CPU": 1}] * free, name="test-blocker") if free else None
    try:
        if blocker is not None:
            assert blocker.wait(60)
        t0 = time.monotonic()
        with pytest.raises(ResourcesBusyError) as info:
            sgl_ray.Engine(tiny_llama_path, tp_size=2, device="cpu", placement_timeout=2)
        assert time.monotonic() - t0 < 60
        message = str(info.value)
        assert "were not placed within 2 s" in message
        assert "of 8 CPUs free" in message
        if blocker is not None:
            assert f"'test-blocker' ({free} CPU)" in message
        assert "placement_timeout" in message
        assert not _pending_groups()  # the engine's own group was given back
    finally:
        if blocker is not None:
            remove_placement_group(blocker)


def test_dead_addresses_fail_or_are_skipped_in_seconds(tmp_path, monkeypatch, caplog):
    port = free_port()
    dead = f"127.0.0.1:{port}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where Ray looks for `ray start`'s record of its cluster
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sgl_ray.actors.cluster"):
        assert cluster_to_join(None) is None  # a stale record: start a local Ray instead
    assert f":{port}) does not answer" in caplog.text and "Starting a local Ray" in caplog.text
    with pytest.raises(RayClusterUnreachableError, match=f"no Ray cluster answers at .*:{port}"):
        cluster_to_join(dead)  # named by the caller: an error naming it
    assert time.monotonic() - t0 < 30


def test_a_local_ray_gets_a_cpu_per_shard_even_past_a_stale_record(tmp_path):
    """Only a stale record of a stopped cluster on the machine: a local Ray starts (in a fresh process), with the
    logical CPUs asked for although the machine has fewer cores."""
    temp = Path(tempfile.mkdtemp(prefix="sgr", dir="/tmp"))  # Ray's socket paths under it must stay short
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        wanted = (os.cpu_count() or 1) + 3
        script = (
            "import ray; from sgl_ray.actors.cluster import ensure_ray; "
            f"assert ensure_ray(None, num_cpus={wanted}); print('CPUs', ray.cluster_resources()['CPU']); "
            "ray.shutdown()"
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp)}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"CPUs {float(wanted)}" in out.stdout
        assert "does not answer: a stale record" in out.stderr
    finally:
        shutil.rmtree(temp, ignore_errors=True)
