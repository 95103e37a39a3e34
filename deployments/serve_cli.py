"""``sgl-ray serve``: start (or join) Ray, deploy the OpenAI app on Ray Serve, print the URL, and shut down
cleanly on Ctrl-C. A Ray cluster it starts itself listens on 127.0.0.1 only (see
:func:`~sgl_ray.actors.ray_core.ensure_ray`); ``--host`` sets where the HTTP server listens."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

import ray
from ray import serve

from sgl_ray.actors.ray_core import ensure_ray
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.deployments.app import build_openai_app
from sgl_ray.model_loader import default_model_path


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--address", dest="ray_address", help="Ray cluster to join (same as --ray-address)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)"
    )
    parser.add_argument("--served-model-name", default=None, help="model id in the API (default: file name)")
    parser.add_argument("--num-replicas", type=int, default=1, help="LLM server replicas")
    parser.add_argument(
        "--ingress-replicas", type=int, default=1, help="HTTP ingress replicas (tokenize, validate, stream)"
    )
    parser.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (enables it)")
    parser.add_argument(
        "--target-ongoing-requests", type=float, default=16, help="autoscaling target per replica"
    )
    parser.add_argument(
        "--router",
        choices=("prefix-cache", "power-of-two", "round-robin"),
        default="prefix-cache",
        help="request router across replicas (token-exact cache-aware by default)",
    )
    parser.add_argument(
        "--routing-imbalance", type=int, default=8, help="extra in-flight requests a cache match may cost"
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=None, help="largest request body (default 16 MiB; 413 above)"
    )
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="characters of one prompt, or of a chat request's messages together (default: 16 per context token)",
    )
    parser.add_argument(
        "--max-message-chars",
        type=int,
        default=None,
        help="characters of one chat message (default: --max-prompt-chars)",
    )
    parser.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=None,
        help="prompts × n in one request (default 1024)",
    )
    parser.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let chat_template_kwargs.chat_template in a request replace the server's chat template",
    )
    parser.add_argument(
        "--tokenizer-threads",
        type=int,
        default=None,
        help="threads per ingress replica that decode, render and tokenize requests (default 2)",
    )


def app_args(ns: argparse.Namespace) -> dict:
    engine = {
        k: v for k, v in vars(EngineArgs.from_cli_args(ns)).items() if v != getattr(EngineArgs, k, None)
    }
    args = {**engine, "num_replicas": ns.num_replicas, "router": ns.router}
    if ns.ingress_replicas != 1:
        args["ingress_replicas"] = ns.ingress_replicas
    if ns.router == "prefix-cache":
        args["routing_imbalance"] = ns.routing_imbalance
    if ns.api_key:
        args["api_key"] = ns.api_key
    if ns.served_model_name:
        args["served_model_name"] = ns.served_model_name
    for key in (
        "max_body_bytes",
        "max_prompt_chars",
        "max_message_chars",
        "max_sequences_per_request",
        "tokenizer_threads",
    ):
        if getattr(ns, key) is not None:
            args[key] = getattr(ns, key)
    if ns.trust_request_chat_template:
        args["trust_request_chat_template"] = True
    if ns.max_replicas:
        args["autoscaling_config"] = {
            "min_replicas": ns.min_replicas or 1,
            "max_replicas": ns.max_replicas,
            "target_ongoing_requests": ns.target_ongoing_requests,
        }
    return args


def run_serve(ns: argparse.Namespace) -> int:
    if not ns.model_path:
        ns.model_path = str(default_model_path())  # fetched here, with progress, before any replica starts
    args = app_args(ns)
    ensure_ray(ns.ray_address, log_to_driver=True)  # a cluster started here listens on 127.0.0.1 only
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(build_openai_app(args), name="sgl_ray", route_prefix="/", blocking=False)
        print(
            f"sgl-ray serving {ns.model_path} at http://{ns.host}:{ns.port}/v1 (Ctrl-C to stop)", flush=True
        )
        while not stop.wait(0.5):
            pass
    finally:
        print("shutting down", file=sys.stderr, flush=True)
        serve.shutdown()
        time.sleep(0.5)
        ray.shutdown()
    return 0
