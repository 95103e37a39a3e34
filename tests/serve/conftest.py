"""A real Ray Serve app on 127.0.0.1 (SmolLM2, one replica, API key on) shared by the Serve tests."""

from __future__ import annotations

import socket

import pytest

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url(ray_cluster, smollm2_path):
    from ray import serve

    from sgl_ray.deployments import build_openai_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_openai_app(
        {
            "model_path": smollm2_path,
            "max_total_tokens": 16384,
            "api_key": API_KEY,
            "served_model_name": "smollm2",
            "max_body_bytes": 2**20,
        }
    )
    serve.run(app, name="main", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def client(serve_url):
    import openai

    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def aclient(serve_url):
    import openai

    return openai.AsyncOpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0)
