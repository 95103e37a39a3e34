"""Two autoscaled replicas behind the token-exact cache-aware router, and ``sgl-ray serve`` as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from .conftest import free_port

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def _running_replicas(app: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments["LLMServer"]
    return dep.replica_states.get("RUNNING", 0)


def test_prefix_families_stay_on_the_replica_that_cached_them(serve_url, tiny_qwen2_path):
    from ray import serve

    from sgl_ray.deployments import build_openai_app

    app = build_openai_app(
        {
            "model_path": tiny_qwen2_path,
            "max_total_tokens": 4096,
            "served_model_name": "tiny",
            "autoscaling_config": {"min_replicas": 2, "max_replicas": 3, "target_ongoing_requests": 8},
        }
    )
    serve.run(app, name="routed", route_prefix="/routed")
    try:
        assert _running_replicas("routed") == 2  # the autoscaling config's floor was applied
        client = openai.OpenAI(base_url=f"{serve_url}/routed/v1", api_key="unused", max_retries=0)
        families = [[1000 * (f + 1) + i for i in range(96)] for f in range(6)]
        for prefix in families:
            r = client.completions.create(
                model="tiny", prompt=prefix + [7, 8, 9], max_tokens=2, temperature=0
            )
            assert r.usage.prompt_tokens_details.cached_tokens == 0
        time.sleep(3)  # replicas publish their radix summaries every second
        for prefix in families:
            r = client.completions.create(model="tiny", prompt=prefix + [5, 6], max_tokens=2, temperature=0)
            # Routed to the replica that cached the family's 96-token prefix (the other one holds none of it).
            assert r.usage.prompt_tokens_details.cached_tokens == 96
    finally:
        serve.delete("routed")


def _listening_addresses(pid: int) -> dict[str, set[str]]:
    """``{address: names of the processes listening there}`` over ``pid`` and its descendants."""
    import psutil

    root = psutil.Process(pid)
    addresses: dict[str, set[str]] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    addresses.setdefault(c.laddr.ip, set()).add(f"{p.name()}:{c.laddr.port}")
        except psutil.NoSuchProcess:  # a worker that exited meanwhile
            pass
    assert addresses, "no listening sockets found"
    return addresses


def test_sgl_ray_serve_subprocess(tiny_qwen2_path, tmp_path):
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sgl_ray.cli",
            "serve",
            "--model-path",
            tiny_qwen2_path,
            "--port",
            str(port),
            "--max-total-tokens",
            "2048",
            "--served-model-name",
            "tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "serve.log", "wb"),
        text=True,
        env=env,
    )
    try:
        line = ""
        deadline = time.monotonic() + 240
        while "serving" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline() or line
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        assert f"http://127.0.0.1:{port}/v1" in line
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        assert r.usage.completion_tokens == 3
        # The Ray cluster it started for itself (GCS, raylet, workers, agents) listens on 127.0.0.1 only. Serve's
        # replicas start their inter-deployment gRPC server on [::] whatever the node address (ray 2.60,
        # serve/_private/replica.py): the one exception, outside what a node address can change.
        listening = _listening_addresses(proc.pid)
        loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
        exposed = {
            name
            for ip, names in listening.items()
            if ip not in loopback
            for name in names
            if not name.startswith("ray::ServeReplica")
        }
        assert not exposed, listening
        assert any(name.startswith("gcs_server") for ip in loopback for name in listening.get(ip, ()))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0  # clean shutdown on Ctrl-C
