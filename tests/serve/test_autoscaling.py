"""Autoscaling while traffic flows: replicas are added under load and removed after it, and no request fails."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest
import yaml

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def _replicas(app: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments["LLMServer"].replica_states.get("RUNNING", 0)


def test_replicas_scale_up_and_down_under_traffic(serve_url, tiny_qwen2_path):
    from ray import serve

    from sgl_ray.deployments import build_openai_app

    app = build_openai_app(
        {
            "model_path": tiny_qwen2_path,
            "max_total_tokens": 4096,
            "served_model_name": "tiny",
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 0.5,
                "downscale_delay_s": 3,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 1,
            },
        }
    )
    serve.run(app, name="scaled", route_prefix="/scaled")
    url = f"{serve_url}/scaled/v1"
    try:
        assert _replicas("scaled") == 1
        seen = {"max": 1}

        async def one(client: openai.AsyncOpenAI, i: int) -> int:
            r = await client.completions.create(
                model="tiny",
                prompt=f"request {i}",
                max_tokens=48,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return r.usage.completion_tokens

        async def traffic() -> list[int]:
            client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
            results: list[int] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (seen["max"] < 2 or len(results) < 24):
                results += await asyncio.gather(*(one(client, len(results) + k) for k in range(6)))
                seen["max"] = max(seen["max"], _replicas("scaled"))
            return results

        results = asyncio.run(traffic())
        assert seen["max"] == 2  # scaled up while requests were flowing
        assert results and all(n == 48 for n in results)  # none failed or was cut short
        deadline = time.monotonic() + 60
        while _replicas("scaled") > 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert _replicas("scaled") == 1  # scaled back down once idle
        sync = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        again = sync.completions.create(
            model="tiny", prompt="again", max_tokens=48, temperature=0, extra_body={"ignore_eos": True}
        )
        assert again.usage.completion_tokens == 48  # and still serving
    finally:
        serve.delete("scaled")


def test_example_serve_yaml_builds(tiny_qwen2_path):
    """``examples/serve.yaml`` names a real builder with valid arguments (``serve run`` uses the same path)."""
    from ray.serve.schema import ServeDeploySchema

    from sgl_ray.deployments import build_openai_app

    config = yaml.safe_load((Path(__file__).parents[2] / "examples" / "serve.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(config)
    (app,) = schema.applications
    assert app.import_path == "sgl_ray.deployments:build_openai_app"
    built = build_openai_app({**app.args, "model_path": tiny_qwen2_path})
    assert type(built).__name__ == "Application"
