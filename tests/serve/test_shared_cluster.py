"""``sgl-ray serve`` on a Ray cluster shared with another Serve app (issue 33, items 1, 2 and 4): the session's
cluster and its app ``main`` (``serve_url``) stand for someone else's.

The checks that end before anything is deployed call the CLI's ``main`` in this process (this process is already
connected to the cluster); Ctrl-C is checked on a real ``sgl-ray serve`` subprocess.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import openai
import pytest
import ray
from ray import serve

from sgl_ray.cli import main

from .conftest import free_port

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_ctrl_c_deletes_only_its_own_app(serve_url, client, tiny_qwen2_path, tmp_path):
    """Joined to a cluster where Serve already runs (no --port: it takes Serve's), the CLI serves its app next to
    ``main`` at the real address, and Ctrl-C deletes that app alone: ``main`` and Serve keep running."""
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sgl_ray.cli",
            "serve",
            "--address",
            ray.get_runtime_context().gcs_address,
            "--app-name",
            "shared_cli",
            "--route-prefix",
            "/shared",
            "--model-path",
            tiny_qwen2_path,
            "--max-total-tokens",
            "2048",
            "--served-model-name",
            "tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=open(log, "wb"),
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 240
        while "serving" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline() or line
            assert proc.poll() is None, log.read_text()[-3000:]
        assert f"at {serve_url}/shared/v1 " in line  # Serve's own HTTP address, under the route prefix
        assert "Serve already runs on this Ray cluster" in log.read_text()
        mine = openai.OpenAI(base_url=f"{serve_url}/shared/v1", api_key="unused", max_retries=0)
        assert (
            mine.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2).usage.completion_tokens == 2
        )
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
    assert code == 0, log.read_text()[-3000:]
    assert "shared_cli" not in serve.status().applications
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
    )
    assert r.usage.completion_tokens == 2  # the other app still answers, on the Serve the CLI did not start


def test_refusals_come_before_anything_is_deployed(
    serve_url, smollm2_path, tiny_qwen2_path, tmp_path, capsys
):
    """Each of these ends in seconds with exit code 2 and one line saying why; nothing is deployed."""
    port = serve_url.rsplit(":", 1)[1]
    other = ["--app-name", "refused", "--route-prefix", "/refused"]
    cases = [
        # Serve's HTTP address is cluster-wide: an explicit --port that differs cannot apply.
        (
            ["--model-path", tiny_qwen2_path, *other, "--port", str(free_port())],
            [f"127.0.0.1:{port}", "--port"],
        ),
        # The app named main serves another model: replacing it needs --replace.
        (["--model-path", tiny_qwen2_path, "--app-name", "main"], ["'main'", smollm2_path, "--replace"]),
        # main holds the route prefix /.
        (
            ["--model-path", tiny_qwen2_path, "--app-name", "refused"],
            ["Prefix / is being used", "--route-prefix"],
        ),
        # A path that does not exist, and a hub id the hub cannot confirm (no network here; unknown where there is).
        (["--model-path", str(tmp_path / "missing"), *other], ["does not exist"]),
        (["--model-path", "sgl-ray-tests/no-such-model", *other], ["could not confirm", "no-such-model"]),
    ]
    for argv, expected in cases:
        t0 = time.monotonic()
        assert main(["serve", *argv]) == 2, argv
        assert time.monotonic() - t0 < 30, argv
        err = capsys.readouterr().err
        last = _last_line(err)
        assert last.startswith("sgl-ray serve: error: "), err
        for text in expected:
            assert text in last, (text, last)
    assert "refused" not in serve.status().applications
    assert serve.status().applications["main"].status == "RUNNING"


def test_replica_load_error_is_the_last_line(serve_url, tiny_llama_path, tmp_path, capsys):
    """A model that passes the CLI's check (its files are there) but does not load in the replica: the CLI stops
    waiting at the first failed replica, removes its app, and ends with the replica's ModelLoadError (exit 1)."""
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_path, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    t0 = time.monotonic()
    code = main(
        ["serve", "--model-path", str(corrupt), "--app-name", "corrupt", "--route-prefix", "/corrupt"]
    )
    elapsed = time.monotonic() - t0
    last = _last_line(capsys.readouterr().err)
    assert code == 1
    assert "ModelLoadError: cannot read safetensors file" in last and str(corrupt) in last, last
    assert "corrupt" not in serve.status().applications
    assert elapsed < 120
