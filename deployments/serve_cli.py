"""``sgl-ray serve``: start (or join) Ray, deploy the OpenAI app on Ray Serve as one application, print its URL,
and on Ctrl-C (SIGINT or SIGTERM) remove what it added, and only that: safe on a cluster shared with other apps.

- It deploys one application, ``--app-name`` (default ``sgl_ray``) at ``--route-prefix`` (default ``/``); on exit it
  deletes that application. It stops Serve only if it started Serve itself and no other application uses it by then.
- Serve's HTTP address is cluster-wide and fixed while Serve runs. Joining a cluster where Serve already runs, the
  app is served at Serve's address, which is what is printed; an explicit ``--host``/``--port`` that differs from it
  is an error (exit 2), since it could not apply.
- An application of the same name that serves another model is not replaced unless ``--replace`` is given.
- A bad model path, bad options, a route prefix in use or an ``--address`` where no Ray answers fail before anything
  is deployed: one line on stderr, exit 2. When a replica fails to start anyway (its model does not load, the
  cluster cannot hold its shards), the application is removed and the replica's error is the last line (exit 1).

A Ray cluster it starts itself listens on 127.0.0.1 only (see :func:`~sgl_ray.actors.cluster.ensure_ray`), with
a logical CPU for each replica and shard at least; ``--host`` sets where the HTTP server listens.

Example::

    sgl-ray serve --address 10.0.0.5:6379 --app-name smollm2 --route-prefix /smollm2
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview

from sgl_ray.actors.cluster import ensure_ray
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.deployments.app import build_openai_app
from sgl_ray.errors import ModelLoadError, SglRayError
from sgl_ray.model_loader import default_model_path, resolve_model

logger = logging.getLogger(__name__)

DEFAULT_APP_NAME = "sgl_ray"
EXIT_BAD_USAGE = 2  # nothing was deployed: fix the command line or the cluster
EXIT_START_FAILED = 1  # a replica failed to start; the application was removed
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # 'org/name', as resolve_model reads it
_SGL_ERROR = re.compile(r"sgl_ray\.errors\.(\w+): (.+)")
_ANY_ERROR = re.compile(r"^\s*([\w.]*(?:Error|Exception)): (.+)$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RETRIED = ("ResourcesBusyError", "EngineDeadError", "StepLostError")  # another try may succeed (Serve's)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--address", dest="ray_address", help="Ray cluster to join (same as --ray-address)")
    parser.add_argument(
        "--host", default=None, help="HTTP host (default 127.0.0.1; Serve already running keeps its own)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="HTTP port (default 8000; Serve already running keeps its own)"
    )
    parser.add_argument(
        "--app-name", default=DEFAULT_APP_NAME, help="the Serve application's name (Ctrl-C deletes only it)"
    )
    parser.add_argument("--route-prefix", default="/", help="HTTP path the application is served under")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace a running application of the same --app-name even if it serves another model",
    )
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
        "--allowed-local-media-path",
        default=None,
        help="a directory under which image parts may name local files (file:// URLs); default: none may",
    )
    parser.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=None,
        metavar="HOST",
        help="fetch image URLs only from these hosts (every redirect too); default: any host",
    )
    parser.add_argument(
        "--image-fetch-timeout-s",
        type=float,
        default=None,
        help="seconds to fetch one image URL, redirects included (default 5)",
    )
    parser.add_argument(
        "--image-fetch-max-redirects",
        type=int,
        default=None,
        help="redirects followed fetching an image URL, each to http(s) only (default 5; 0: none)",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=None,
        help="bytes of one image, fetched or sent (default 20 MiB)",
    )
    parser.add_argument(
        "--max-images-per-prompt", type=int, default=None, help="images in one prompt (default 16)"
    )
    parser.add_argument(
        "--max-request-resumes",
        type=int,
        default=None,
        help="replicas a request may lose and still resume from its tokens on another (default 3)",
    )
    parser.add_argument(
        "--request-resume-timeout-s",
        type=float,
        default=None,
        help="seconds a request whose replica died waits for another to go on before it fails (default 60)",
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
    args = {**engine, "router": ns.router}
    # With autoscaling, Serve's replica count is the autoscaler's (both: an app error).
    if not ns.max_replicas:
        args["num_replicas"] = ns.num_replicas
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
        "allowed_local_media_path",
        "allowed_media_domains",
        "image_fetch_timeout_s",
        "image_fetch_max_redirects",
        "max_image_bytes",
        "max_images_per_prompt",
        "max_request_resumes",
        "request_resume_timeout_s",
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


class ServeCliError(Exception):
    """Ends ``sgl-ray serve`` with one line on stderr and ``exit_code``, once what it added is removed."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_serve(ns: argparse.Namespace) -> int:
    """Run ``sgl-ray serve`` until Ctrl-C; the exit code (0, or :data:`EXIT_BAD_USAGE` / :data:`EXIT_START_FAILED`
    with the reason as the last line on stderr)."""
    session = _ServeSession(ns.app_name)
    message = None
    try:
        session.run(ns)
    except ServeCliError as e:
        message = e
    finally:
        session.close()
    if message is None:
        return 0
    print(f"sgl-ray serve: error: {message}", file=sys.stderr, flush=True)  # after the cleanup's own output
    return message.exit_code


class _ServeSession:
    """What one ``sgl-ray serve`` added to the cluster, so that :meth:`close` removes exactly that."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self.stop = threading.Event()
        self.owns_ray = self.started_serve = self.deployed = False
        self._handlers: dict[int, object] = {}

    def run(self, ns: argparse.Namespace) -> None:
        if not ns.app_name:
            raise ServeCliError("--app-name must not be empty")
        if not ns.route_prefix.startswith("/"):
            raise ServeCliError(f"--route-prefix must start with '/', not {ns.route_prefix!r}")
        try:
            ns.model_path = ns.model_path or str(default_model_path())  # fetched here, with progress
            check_model_path(ns.model_path, ns.revision, ns.load_format)
            app = build_openai_app(app_args(ns))  # validates every option
            self.owns_ray = ensure_ray(ns.ray_address, log_to_driver=True, num_cpus=cpus_needed(ns))
        except SglRayError as e:
            raise ServeCliError(e.message) from None
        running = _running_http_options()
        host, port = _http_address(ns, running)
        _check_app_name(ns.app_name, ns.model_path, ns.replace)
        self._catch_signals()
        if running is None:
            serve.start(http_options={"host": host, "port": port})
            self.started_serve = True
        try:
            target = serve.RunTarget(target=app, name=ns.app_name, route_prefix=ns.route_prefix)
            serve.run_many([target], wait_for_applications_running=False)
        except RayServeException as e:  # a route prefix another application holds
            raise ServeCliError(f"{_cause(e)} Pick another --route-prefix.") from None
        self.deployed = True
        failure = _wait_until_running(ns.app_name, self.stop)
        if failure is not None:
            raise ServeCliError(f"application {ns.app_name!r} did not start: {failure}", EXIT_START_FAILED)
        if self.stop.is_set():
            return
        url = f"http://{_shown_host(host)}:{port}{ns.route_prefix.rstrip('/')}/v1"
        print(f"sgl-ray serving {ns.model_path} at {url} (app {ns.app_name!r}; Ctrl-C to stop)", flush=True)
        self.stop.wait()

    def close(self) -> None:
        """Delete the application, stop Serve if this session started it and no other application uses it, and
        disconnect from Ray (which stops a cluster this session started); each step even if one before failed."""
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        if self.deployed or self.started_serve:
            print("shutting down", file=sys.stderr, flush=True)
        try:
            if self.deployed:
                serve.delete(self.app_name)  # waits until it is gone
            if self.started_serve:
                others = sorted(serve.status().applications)
                if others:
                    print(f"Serve keeps running: applications {others} use it", file=sys.stderr, flush=True)
                else:
                    serve.shutdown()
        except Exception:  # the cluster went away meanwhile: nothing left to remove
            logger.warning("could not remove application %r", self.app_name, exc_info=True)
        if self.owns_ray:
            ray.shutdown()

    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._handlers[sig] = signal.signal(sig, lambda *_: self.stop.set())


def check_model_path(model_path: str, revision: str | None = None, load_format: str = "auto") -> None:
    """Raise :class:`~sgl_ray.errors.ModelLoadError` (one line) unless ``model_path`` can load: a local directory or
    ``.gguf`` file with what the engine reads, or a hub id that is in the local cache or that the hub confirms (its
    files are downloaded later, by each replica). Takes seconds, network included.

    Example::

        >>> check_model_path("/no/such/model")  # doctest: +SKIP
        ModelLoadError: model path '/no/such/model' does not exist: expected a directory with config.json ...
    """
    if Path(model_path).expanduser().exists() or not _HUB_ID.fullmatch(model_path):
        resolve_model(model_path, revision=revision, weights=load_format != "dummy")
        return
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_path, "config.json", revision=revision), str):
        return
    try:
        HfApi().model_info(model_path, revision=revision, timeout=10)
    except Exception as exc:  # offline, unknown, gated: the replicas could not download it either
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            f"model path {model_path!r} is not a local path, and the model hub could not confirm it "
            f"({type(exc).__name__}: {reason}). Pass a local directory or .gguf file, or make the hub reachable "
            "(HF_ENDPOINT, HF_TOKEN)"
        ) from None


def cpus_needed(ns: argparse.Namespace) -> int:
    """Logical CPUs the app's replicas take: one per ``LLMServer`` replica, plus one per shard of a Ray engine."""
    engine = EngineArgs.from_cli_args(ns)
    shards = engine.tp_size * engine.pp_size * engine.dp_size if engine.uses_ray else 0
    return max(ns.max_replicas or 0, ns.num_replicas) * (1 + shards)


def _running_http_options():
    """The HTTP options of the Serve running on the cluster (``host``, ``port``), or None where none runs. Serve
    has no public getter for them, so this asks its controller client."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config


def _http_address(ns: argparse.Namespace, running) -> tuple[str, int]:
    if running is None:
        return ns.host or "127.0.0.1", ns.port or 8000
    asked = {"--host": (ns.host, running.host), "--port": (ns.port, running.port)}
    differ = [f"{flag} {v}" for flag, (v, theirs) in asked.items() if v is not None and v != theirs]
    if differ:
        raise ServeCliError(
            f"Serve already runs on this Ray cluster with its HTTP proxy at {running.host}:{running.port}, and "
            f"Serve's HTTP address cannot change while it runs, so {' and '.join(differ)} cannot apply. Leave "
            "--host/--port out to add this application to the running Serve, or stop Serve first (serve shutdown)"
        )
    print(
        f"Serve already runs on this Ray cluster: adding application {ns.app_name!r} to it "
        f"(HTTP at {running.host}:{running.port})",
        file=sys.stderr,
        flush=True,
    )
    return running.host, running.port


def _check_app_name(name: str, model_path: str, replace: bool) -> None:
    """Refuse to replace a running application of this name unless it serves the same model or ``replace``."""
    app = serve.status().applications.get(name)
    if app is None or replace or app.status == ApplicationStatus.DELETING:
        return
    theirs = _served_models(name, app)
    if any(_same_path(m, model_path) for m in theirs):
        print(f"updating the running application {name!r} (it serves the same model)", file=sys.stderr)
        return
    what = (
        f"serves {', '.join(theirs)}"
        if theirs
        else f"is {app.status.value}, serving no model sgl-ray can see"
    )
    raise ServeCliError(
        f"a Serve application named {name!r} already runs on this cluster and {what}: deploying would replace it. "
        "Pick another --app-name (and --route-prefix), or pass --replace"
    )


def _served_models(name: str, app: ApplicationStatusOverview) -> list[str]:
    """The model paths of the application's ``LLMServer`` deployments (none where it is not running)."""
    if app.status != ApplicationStatus.RUNNING:
        return []
    paths = []
    for deployment in app.deployments:
        if not deployment.startswith("LLMServer"):
            continue
        try:
            handle = serve.get_deployment_handle(deployment, app_name=name)
            paths.append(handle.model_info.remote().result(timeout_s=30)["model_path"])
        except Exception:  # not an sgl_ray LLMServer after all
            logger.debug("could not ask %s of application %r for its model", deployment, name, exc_info=True)
    return paths


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


def _wait_until_running(name: str, stop: threading.Event) -> str | None:
    """None once the application runs (or Ctrl-C came); else why it cannot. A replica that failed for a reason a
    retry cannot change (an sgl_ray error other than :data:`_RETRIED`) ends the wait at once; Serve would retry it."""
    while True:
        app = serve.status().applications.get(name)
        if app is not None:
            if app.status == ApplicationStatus.RUNNING:
                return None
            error = _replica_error(app)
            if app.status == ApplicationStatus.DEPLOY_FAILED:
                return error or _last_error_line(_messages(app))
            if error is not None and not error.startswith(_RETRIED):
                return error
        if stop.wait(0.5):
            return None


def _messages(app: ApplicationStatusOverview) -> str:
    """The application's and its deployments' status messages (replica tracebacks among them), uncoloured."""
    return _ANSI.sub("", "\n".join([app.message, *(d.message for d in app.deployments.values())]))


def _replica_error(app: ApplicationStatusOverview) -> str | None:
    """``"ModelLoadError: ..."``: the last sgl_ray error in the application's status messages."""
    found = _SGL_ERROR.findall(_messages(app))
    return f"{found[-1][0]}: {found[-1][1].strip()}" if found else None


def _last_error_line(text: str) -> str:
    found = _ANY_ERROR.findall(text)
    if found:
        return f"{found[-1][0]}: {found[-1][1].strip()}"
    return (text.strip().splitlines() or ["failed"])[0]


def _cause(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    return str(cause if isinstance(cause, BaseException) else error).strip()


def _shown_host(host: str) -> str:
    """A host to print in a URL: a wildcard listen address becomes this cluster's head node address."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    gcs = ray.get_runtime_context().gcs_address
    return gcs.rpartition(":")[0] or os.uname().nodename
