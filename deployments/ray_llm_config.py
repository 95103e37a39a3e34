"""Ray Serve LLM's configuration (``{"llm_configs": [LLMConfig, ...]}``) in sgl_ray terms, so a Ray user's YAML
runs with only ``import_path`` changed.

Each ``LLMConfig`` becomes one :class:`ModelSpec`: ``model_loading_config.model_id`` is the model's name in the
API, ``model_source`` (default: the id) its path or hub id, ``tokenizer_source`` its tokenizer; ``engine_kwargs``
are engine options, in sgl_ray's names or vLLM's (:data:`VLLM_ENGINE_KWARGS`); ``deployment_config`` holds the
Serve options of the model's ``LLMServer`` deployment (``num_replicas`` or ``autoscaling_config``,
``max_ongoing_requests``, ``ray_actor_options``, …), ``accelerator_type`` and ``runtime_env`` go into its
``ray_actor_options``; ``lora_config`` turns LoRA on (``dynamic_lora_loading_path``: adapters named
``<model_id>:<adapter>`` load from ``<path>/<adapter>`` on first use; ``max_num_adapters_per_replica``: adapters
in a batch). Deployments are named as Ray names them (``LLMServer:<model id>``, ``/`` → ``--``, ``.`` → ``_``), so
a config's ``deployments:`` overrides find them.

Invariant: nothing is dropped silently. A field sgl_ray cannot honour (``placement_group_config``,
``accelerator_config``, ``server_cls``, an unknown engine option) is an error naming it; the few accepted and
ignored are listed in :data:`IGNORED_FIELDS` and :data:`IGNORED_VLLM_KWARGS` (vLLM knobs with no meaning here).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.errors import InvalidRequestError

VLLM_ENGINE_KWARGS = {
    "max_model_len": "context_length",
    "tensor_parallel_size": "tp_size",
    "pipeline_parallel_size": "pp_size",
    "data_parallel_size": "dp_size",
    "gpu_memory_utilization": "mem_fraction_static",
    "max_num_seqs": "max_running_requests",
    "max_num_batched_tokens": "chunked_prefill_size",
    "tokenizer": "tokenizer_path",
    "seed": "random_seed",
    "max_loras": "max_loras_per_batch",
    "enforce_eager": "disable_cuda_graph",
}
"""vLLM's engine argument → sgl_ray's (``enable_prefix_caching`` and ``enable_chunked_prefill`` are translated
too: off means ``disable_radix_cache``, and chunked prefill off)."""
IGNORED_VLLM_KWARGS = frozenset(
    {"trust_remote_code", "distributed_executor_backend", "disable_log_stats", "enable_log_requests"}
)
"""vLLM engine arguments accepted and ignored: sgl_ray runs no model code from the hub, always runs on Ray, and logs
as it does."""
IGNORED_FIELDS = frozenset({"llm_engine", "log_engine_metrics", "experimental_configs"})
"""``LLMConfig`` fields accepted and ignored: the engine is sgl_ray's, its metrics are at ``/metrics``, and Ray's
experimental knobs tune Ray's own ingress."""
_UNSUPPORTED_FIELDS = {
    "placement_group_config": "the engine places its own shards (tp_size, pp_size in engine_kwargs)",
    "accelerator_config": "use accelerator_type",
    "server_cls": "the server is sgl_ray's LLMServer",
    "callback_config": "sgl_ray has no engine callbacks",
}
_DEPLOYMENT_KEYS = frozenset(
    {
        "name",
        "num_replicas",
        "autoscaling_config",
        "max_ongoing_requests",
        "max_queued_requests",
        "ray_actor_options",
        "user_config",
        "health_check_period_s",
        "health_check_timeout_s",
        "graceful_shutdown_wait_loop_s",
        "graceful_shutdown_timeout_s",
        "logging_config",
        "request_router_config",
    }
)
_LORA_KEYS = frozenset(
    {"dynamic_lora_loading_path", "max_num_adapters_per_replica", "download_timeout_s", "max_download_tries"}
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of an app: its name in the API, engine options (``model_path`` set), the Serve options and name
    of its ``LLMServer`` deployment, and where LoRA adapters named on the fly are loaded from."""

    model_id: str
    engine_kwargs: dict[str, Any]
    deployment_options: dict[str, Any]
    deployment_name: str
    dynamic_lora_path: str | None = None


def check_scaling(options: dict[str, Any], where: str) -> None:
    """``num_replicas`` and ``autoscaling_config`` are alternatives (``num_replicas: auto`` aside, which asks
    Serve for its default autoscaling): both is an error, as it is in Serve."""
    if "autoscaling_config" in options and options.get("num_replicas") not in (None, "auto"):
        raise InvalidRequestError(
            f"{where}: set num_replicas or autoscaling_config (min_replicas, max_replicas), not both",
            param="num_replicas",
        )


def deployment_name(prefix: str, model_id: str) -> str:
    """Ray Serve LLM's deployment name for a model: ``LLMServer:qwen--Qwen2_5-0_5B`` for ``qwen/Qwen2.5-0.5B``."""
    return f"{prefix}:{model_id.replace('/', '--').replace('.', '_')}"


def model_specs(llm_configs: list[Any]) -> list[ModelSpec]:
    """The :class:`ModelSpec` of each ``LLMConfig`` (a dict, a ``ray.serve.llm.LLMConfig``, or a YAML file's path).

    Example::

        >>> specs = model_specs([{"model_loading_config": {"model_id": "a", "model_source": "/m/a"},
        ...                       "engine_kwargs": {"max_model_len": 2048},
        ...                       "deployment_config": {"num_replicas": 2}}])
        >>> specs[0].engine_kwargs, specs[0].deployment_options, specs[0].deployment_name
        ({'context_length': 2048, 'model_path': '/m/a'}, {'num_replicas': 2}, 'LLMServer:a')
    """
    if not isinstance(llm_configs, list) or not llm_configs:
        raise InvalidRequestError("llm_configs must be a non-empty list of LLM configs", param="llm_configs")
    specs = [_spec(_as_dict(c), i) for i, c in enumerate(llm_configs)]
    ids = [s.model_id for s in specs]
    if len(set(ids)) != len(ids):
        raise InvalidRequestError(f"llm_configs: model ids must be unique, got {ids}", param="llm_configs")
    return specs


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, Path)):  # Ray accepts a path to a YAML file holding one LLMConfig
        import yaml

        try:
            loaded = yaml.safe_load(Path(config).read_text())
        except OSError as e:
            raise InvalidRequestError(
                f"llm_configs: cannot read {config}: {e}", param="llm_configs"
            ) from None
        if not isinstance(loaded, dict):
            raise InvalidRequestError(
                f"llm_configs: {config} holds no LLM config mapping", param="llm_configs"
            )
        return loaded
    if hasattr(config, "model_dump"):  # a ray.serve.llm.LLMConfig
        return {k: v for k, v in config.model_dump(exclude_unset=True).items() if v is not None}
    raise InvalidRequestError(f"llm_configs: unsupported entry {type(config).__name__}", param="llm_configs")


def _spec(config: dict[str, Any], index: int) -> ModelSpec:
    where = f"llm_configs[{index}]"
    for key in config:
        if key in _UNSUPPORTED_FIELDS:
            raise InvalidRequestError(
                f"{where}.{key} is not supported: {_UNSUPPORTED_FIELDS[key]}", param=key
            )
    known = {"model_loading_config", "engine_kwargs", "deployment_config", "accelerator_type", "lora_config"}
    known |= {"runtime_env"} | IGNORED_FIELDS
    if unknown := sorted(set(config) - known):
        raise InvalidRequestError(f"{where}: unknown fields {unknown}", param="llm_configs")
    loading = config.get("model_loading_config")
    if not isinstance(loading, dict) or not loading.get("model_id"):
        raise InvalidRequestError(f"{where}.model_loading_config.model_id is required", param="llm_configs")
    if unknown := sorted(set(loading) - {"model_id", "model_source", "tokenizer_source"}):
        raise InvalidRequestError(
            f"{where}.model_loading_config: unknown fields {unknown}", param="llm_configs"
        )
    model_id = str(loading["model_id"])
    source = loading.get("model_source") or model_id
    if not isinstance(source, str):  # Ray's cloud mirror configs (S3, GCS)
        raise InvalidRequestError(
            f"{where}.model_loading_config.model_source must be a path or hub id", param="llm_configs"
        )
    engine = engine_kwargs(dict(config.get("engine_kwargs") or {}), where)
    engine["model_path"] = source
    if loading.get("tokenizer_source"):
        engine["tokenizer_path"] = loading["tokenizer_source"]
    lora = config.get("lora_config")
    dynamic_path = None
    if lora is not None:
        if unknown := sorted(set(lora) - _LORA_KEYS):
            raise InvalidRequestError(f"{where}.lora_config: unknown fields {unknown}", param="lora_config")
        engine["enable_lora"] = True
        if lora.get("max_num_adapters_per_replica") is not None:
            engine.setdefault("max_loras_per_batch", lora["max_num_adapters_per_replica"])
        dynamic_path = lora.get("dynamic_lora_loading_path")
    EngineArgs(**engine)  # validate before any replica starts
    options = dict(config.get("deployment_config") or {})
    if unknown := sorted(set(options) - _DEPLOYMENT_KEYS):
        raise InvalidRequestError(
            f"{where}.deployment_config: unknown fields {unknown}", param="deployment_config"
        )
    check_scaling(options, f"{where}.deployment_config")
    name = options.pop("name", None) or deployment_name("LLMServer", model_id)
    actor = dict(options.get("ray_actor_options") or {})
    if config.get("accelerator_type"):
        actor["accelerator_type"] = config["accelerator_type"]
    if config.get("runtime_env"):
        actor["runtime_env"] = {**actor.get("runtime_env", {}), **config["runtime_env"]}
    if actor:
        options["ray_actor_options"] = actor
    return ModelSpec(model_id, engine, options, name, dynamic_path)


def engine_kwargs(kwargs: dict[str, Any], where: str = "llm_config") -> dict[str, Any]:
    """Engine options in sgl_ray's names from ``kwargs`` in sgl_ray's or vLLM's; an unknown one is an error.

    >>> engine_kwargs({"tensor_parallel_size": 2, "enable_prefix_caching": False, "trust_remote_code": True})
    {'tp_size': 2, 'disable_radix_cache': True}
    """
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in IGNORED_VLLM_KWARGS:
            continue
        if key == "enable_prefix_caching":
            out["disable_radix_cache"] = not value
        elif key == "enable_chunked_prefill":
            if not value:
                out["chunked_prefill_size"] = -1
        elif key in VLLM_ENGINE_KWARGS:
            out[VLLM_ENGINE_KWARGS[key]] = value
        elif key in fields:
            out[key] = value
        else:
            raise InvalidRequestError(
                f"{where}.engine_kwargs: unknown engine option {key!r} (sgl_ray's options, or vLLM's "
                f"{sorted(VLLM_ENGINE_KWARGS)})",
                param="engine_kwargs",
            )
    return out
