"""Builders for the Serve application: addressable from ``serve run`` / ``serve deploy`` YAML as
``import_path: sgl_ray.deployments:build_openai_app``."""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve
from ray.serve import Application

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.deployments.ingress import OpenAIIngress
from sgl_ray.deployments.llm_server import LLMServer
from sgl_ray.deployments.lora_registry import LoRARegistry
from sgl_ray.deployments.ray_llm_config import ModelSpec, check_scaling, deployment_name, model_specs
from sgl_ray.deployments.resume import ResumePolicy
from sgl_ray.errors import InvalidRequestError
from sgl_ray.lora.adapter import parse_lora_paths, resolve_max_rank
from sgl_ray.model_loader import default_model_path
from sgl_ray.multimodal.inputs import ImageLimits
from sgl_ray.protocol import RequestLimits

_INGRESS_KEYS = (
    "served_model_name",
    "api_key",
    "max_body_bytes",
    "max_prompt_chars",
    "max_message_chars",
    "max_sequences_per_request",
    "trust_request_chat_template",
    "tokenizer_threads",
    "allowed_local_media_path",  # the directory under which image parts may name local files
    "allowed_media_domains",  # image URLs: only from these hosts
    "image_fetch_timeout_s",
    "image_fetch_max_redirects",
    "max_image_bytes",
    "max_images_per_prompt",
    "request_resume_timeout_s",
    "max_request_resumes",
)
_ROUTERS = {
    "prefix-cache": "sgl_ray.deployments.router:PrefixCacheRouter",
    "power-of-two": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",  # Serve's default
    "round-robin": "sgl_ray.deployments.router:RoundRobinRouter",
}
_DEPLOYMENT_KEYS = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "ray_actor_options")
_APP_KEYS = ("routing_imbalance", "router", "ingress_replicas")
_LLM_CONFIGS_KEYS = {"llm_configs", "ingress_deployment_config", *_APP_KEYS, *_INGRESS_KEYS} - {
    "served_model_name"
}


def build_openai_app(args: dict[str, Any] | None = None) -> Application:
    """An OpenAI-compatible app: an ``OpenAIIngress`` in front of ``LLMServer`` replicas (one engine each) with
    token-exact cache-aware routing.

    ``args``, either flat for one model: any :class:`~sgl_ray.EngineArgs` field (``model_path``, ``tp_size``,
    ``max_total_tokens``, ``tool_call_parser``, ``reasoning_parser``, ``lora_allow_pickle`` …), the ingress options
    ``served_model_name``, ``api_key``, ``max_body_bytes`` (default 16 MiB; a 413 above), ``max_prompt_chars``
    (characters of one prompt, or of a chat request's messages together; default 16 per token of context),
    ``max_message_chars`` (of one chat message; default ``max_prompt_chars``), ``max_sequences_per_request``
    (prompts × ``n``; default 1024), ``trust_request_chat_template`` (let ``chat_template_kwargs.chat_template``
    replace the server's chat template; default off), ``tokenizer_threads`` (threads that decode, render and
    tokenize requests off the event loop; default 2), ``request_resume_timeout_s`` and ``max_request_resumes``
    (how a request whose replica dies is resumed on another; defaults 60 and 3: see
    :class:`~sgl_ray.deployments.resume.ResumePolicy`), the image options ``allowed_local_media_path``,
    ``allowed_media_domains``, ``image_fetch_timeout_s``, ``image_fetch_max_redirects``, ``max_image_bytes`` and
    ``max_images_per_prompt`` (see :meth:`~sgl_ray.multimodal.ImageLimits.from_options`), and the ``LLMServer``
    deployment's ``num_replicas`` or ``autoscaling_config`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, delays; both is an
    error), ``max_ongoing_requests``, ``ray_actor_options``; ``router`` (``prefix-cache``, the default, Serve's
    ``power-of-two`` or ``round-robin``) and ``routing_imbalance`` choose and tune the request router;
    ``ingress_replicas`` (default 1) runs several ``OpenAIIngress`` replicas behind Serve's proxy. With LoRA
    enabled, the app also holds a one-replica ``LoRARegistry`` that every ingress replica follows.

    Or Ray Serve LLM's shape, for one or several models routed by the request's ``model``: ``llm_configs`` (a list
    of ``LLMConfig`` dicts, objects or YAML paths; see :mod:`sgl_ray.deployments.ray_llm_config`), optionally
    ``ingress_deployment_config`` (the ingress's Serve options) and the shared ingress and router options above.
    Scaling settings stay in each deployment's Serve options, so changing them (``serve deploy`` again) is a
    lightweight update that keeps the running replicas.

    Example::

        >>> from ray import serve
        >>> from sgl_ray.deployments import build_openai_app
        >>> serve.run(build_openai_app({"model_path": "/models/smollm2", "num_replicas": 2}))  # doctest: +SKIP
        >>> serve.run(build_openai_app({"llm_configs": [  # doctest: +SKIP
        ...     {"model_loading_config": {"model_id": "small", "model_source": "/models/smollm2"},
        ...      "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}},
        ...     {"model_loading_config": {"model_id": "gemma", "model_source": "/models/gemma-3-270m"}},
        ... ]}))
    """
    args = dict(args or {})
    if "llm_configs" in args:
        return _build_llm_configs(args)
    engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
    allowed = engine_fields | set(_INGRESS_KEYS) | set(_DEPLOYMENT_KEYS) | set(_APP_KEYS)
    if unknown := sorted(set(args) - allowed):
        raise InvalidRequestError(f"unknown app options {unknown}")
    engine_kwargs = {k: v for k, v in args.items() if k in engine_fields}
    engine_kwargs["model_path"] = engine_kwargs.get("model_path") or str(default_model_path())
    options: dict[str, Any] = {k: args[k] for k in _DEPLOYMENT_KEYS if k in args}
    check_scaling(options, "build_openai_app")
    name = args.get("served_model_name") or _default_name(engine_kwargs["model_path"])
    spec = ModelSpec(name, engine_kwargs, options, "LLMServer")
    shared = _shared_options(args)
    server, model_config, registry = _model_deployments(spec, args, registry_name="LoRARegistry")
    return _ingress(args).bind(server, {**shared, **model_config}, registry)


def _build_llm_configs(args: dict[str, Any]) -> Application:
    if "ingress_cls_config" in args:
        raise InvalidRequestError(
            "ingress_cls_config is not supported: the ingress is sgl_ray's OpenAIIngress"
        )
    if unknown := sorted(set(args) - _LLM_CONFIGS_KEYS):
        raise InvalidRequestError(f"unknown app options {unknown} beside llm_configs")
    specs = model_specs(args["llm_configs"])
    servers, configs, registries = {}, {}, {}
    for spec in specs:
        registry_name = deployment_name("LoRARegistry", spec.model_id)
        server, config, registry = _model_deployments(spec, args, registry_name=registry_name)
        servers[spec.model_id], configs[spec.model_id], registries[spec.model_id] = server, config, registry
    options = dict(args.get("ingress_deployment_config") or {})
    check_scaling(options, "ingress_deployment_config")
    return _ingress(args, options).bind(servers, {**_shared_options(args), "models": configs}, registries)


def _model_deployments(
    spec: ModelSpec, args: dict[str, Any], *, registry_name: str
) -> tuple[Application, dict[str, Any], Application | None]:
    """One model's ``LLMServer`` deployment, its options for the ingress, and its ``LoRARegistry`` (LoRA only)."""
    engine_kwargs = spec.engine_kwargs
    engine_args = EngineArgs(**engine_kwargs)  # validate before any replica starts
    options = dict(spec.deployment_options)
    options.setdefault("max_ongoing_requests", 256)
    gpus = 1 if engine_kwargs.get("device", "auto") != "cpu" and _has_gpu() else 0
    if engine_kwargs.get("tp_size", 1) * engine_kwargs.get("pp_size", 1) > 1:
        gpus = 0  # the replica's engine group reserves the shards' devices itself
    options["ray_actor_options"] = {
        "num_cpus": 1,
        "num_gpus": gpus,
        **(options.get("ray_actor_options") or {}),
    }
    router = args.get("router", "prefix-cache")
    if router not in _ROUTERS:
        raise InvalidRequestError(f"router must be one of {sorted(_ROUTERS)}", param="router")
    router_kwargs = (
        {"imbalanced_threshold": args.get("routing_imbalance", 8)} if router == "prefix-cache" else {}
    )
    options.setdefault(
        "request_router_config",
        {
            "request_router_class": _ROUTERS[router],
            "request_router_kwargs": router_kwargs,
            "request_routing_stats_period_s": 1.0,
        },
    )
    options.setdefault("health_check_period_s", 10)
    server = serve.deployment(LLMServer, name=spec.deployment_name).options(**options).bind(engine_kwargs)
    config = {
        "served_model_name": spec.model_id,
        "tool_call_parser": engine_args.tool_call_parser,
        "reasoning_parser": engine_args.reasoning_parser,
        "model_path": engine_kwargs["model_path"],
        "context_length": engine_kwargs.get("context_length"),
        "tokenizer_path": engine_kwargs.get("tokenizer_path"),
        "enable_lora": engine_args.lora_enabled,
        "lora_paths": engine_args.lora_paths,
        "lora_allow_pickle": engine_args.lora_allow_pickle,
        "max_lora_rank": resolve_max_rank(engine_args.max_lora_rank, engine_args.lora_paths)
        if engine_args.lora_enabled
        else None,
        "dynamic_lora_loading_path": spec.dynamic_lora_path,
    }
    registry = None
    if engine_args.lora_enabled:
        start = {name: (path, False) for name, path in parse_lora_paths(engine_args.lora_paths).items()}
        registry = (
            serve.deployment(LoRARegistry, name=registry_name)
            .options(
                num_replicas=1,
                max_ongoing_requests=4096,  # each ingress replica keeps one watch call open
                ray_actor_options={"num_cpus": 0},
                graceful_shutdown_wait_loop_s=0.2,
                graceful_shutdown_timeout_s=1,  # open watch calls need not finish
            )
            .bind(start)
        )
    return server, config, registry


def _shared_options(args: dict[str, Any]) -> dict[str, Any]:
    """The ingress options that apply to every model, checked before any replica starts."""
    limits = ("max_prompt_chars", "max_message_chars", "max_sequences_per_request")
    RequestLimits.for_context(1, **{k: args[k] for k in limits if args.get(k) is not None})
    threads = args.get("tokenizer_threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InvalidRequestError("tokenizer_threads must be an integer >= 1", param="tokenizer_threads")
    ResumePolicy.from_config(args)
    ImageLimits.from_options(args)
    return {k: args[k] for k in _INGRESS_KEYS if k in args and k != "served_model_name"}


def _ingress(args: dict[str, Any], options: dict[str, Any] | None = None) -> Any:
    options = dict(options or {})
    ingress_replicas = args.get("ingress_replicas", 1)
    if not isinstance(ingress_replicas, int) or isinstance(ingress_replicas, bool) or ingress_replicas < 1:
        raise InvalidRequestError("ingress_replicas must be an integer >= 1", param="ingress_replicas")
    if "autoscaling_config" not in options:
        options.setdefault("num_replicas", ingress_replicas)
    options.setdefault("max_ongoing_requests", 1024)
    options["ray_actor_options"] = {"num_cpus": 0, **(options.get("ray_actor_options") or {})}
    return serve.deployment(OpenAIIngress, name="OpenAIIngress").options(**options)


def _default_name(model_path: str) -> str:
    name = model_path.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
