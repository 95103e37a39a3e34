"""Backend flags shared by the frontend-language examples (``lang_*.py``).

``--backend runtime`` (default) talks to ``sgl-ray serve`` at ``--url`` (http://127.0.0.1:8000); ``--backend
engine`` runs an in-process ``sgl_ray.Engine`` (``--model-path``, default SmolLM2); ``--backend openai`` uses any
OpenAI-compatible server (``--url .../v1 --model NAME``; chat models only generate, they cannot ``select``).
"""

from __future__ import annotations

import argparse

import sgl_ray.lang as sgl


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--backend", choices=["runtime", "engine", "openai"], default="runtime")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name for --backend openai")
    p.add_argument("--model-path", default=None, help="model for --backend engine (default: SmolLM2)")
    p.add_argument("--max-tokens", type=int, default=64)
    return p


def make_backend(args: argparse.Namespace) -> sgl.Backend:
    if args.backend == "engine":
        import atexit

        import sgl_ray

        engine = sgl_ray.Engine(args.model_path)
        atexit.register(engine.shutdown)  # stop the engine thread before the interpreter goes
        return sgl.EngineBackend(engine)
    if args.backend == "openai":
        return sgl.OpenAI(args.model, base_url=args.url, api_key=args.api_key)
    return sgl.RuntimeEndpoint(args.url, api_key=args.api_key)
