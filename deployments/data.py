"""Ray Data batch inference: ``build_processor`` turns a :class:`ray.data.Dataset` of prompts into one of
completions with a pool of :class:`sgl_ray.Engine` actors, in the shape of ``ray.data.llm``: the same config
names (``model_source``, ``concurrency`` as ``n`` or ``(min, max)``, ``batch_size``, ``should_continue_on_error``,
``chat_template_stage``) and the same ``build_processor(config, preprocess, postprocess, …)`` signature. Importing
this module registers :class:`ProcessorConfig` with ``ray.data.llm``'s builder registry, so
``ray.data.llm.build_processor(ProcessorConfig(...))`` builds the same processor.

The pipeline (lazy, like every Ray Data transform)::

    ds.map(preprocess) ─▶ map_batches(sort_window) ─▶ repartition(batch_size rows) ─▶ engine actors ─▶ map(postprocess)
                          └──────────── order_by_prefix ─────────────┘                `concurrency`

Prefix-aware ordering sorts each window of ``prefix_window`` consecutive rows by prompt (:func:`prompt_key`,
no tokenizer needed), so prompts that share a prefix land in the same batches and their prefix is computed about
once per window, not once per batch. A window is sorted inside a streaming task: no all-to-all exchange, no
barrier across the dataset, so generation starts once the first window is preprocessed (with a ``preprocess``,
Ray Data fuses the sort into its tasks). Its rows then come back grouped by prompt within each window. With
``order_by_prefix=False`` rows come back in input order (the processor sets Ray Data's ``preserve_order`` on its
own copy of the dataset's context).

Each engine actor runs up to ``max_concurrent_batches`` batches at once, so continuous batching overlaps the tail of
one batch with the next; engine progress (rows, tokens/s, cache hits) is logged from each actor after its first
batch, then every ``log_interval_s`` seconds, and each row gets ``time_taken_llm``. A failing row raises an error
naming the row, or, with ``should_continue_on_error``, gets the message in ``__inference_error__`` and skips
``postprocess``.

Images (vision-language models): a ``messages`` row's content parts ``{"type": "image", "image": ...}`` (Ray Data
LLM's) or ``{"type": "image_url", "image_url": {"url": ...}}`` (OpenAI's), or an ``image`` column next to a
``prompt``/``input_ids`` that holds the model's image placeholder, one per image; PIL images, bytes, paths,
``data:`` URLs and arrays. A bad image fails its row only.

Tools: a ``messages`` row with ``tools`` (OpenAI's chat shape, a list or its JSON text) and optionally
``tool_choice`` is rendered and planned as ``/v1/chat/completions`` does (``required`` or a named function forces
the call format), and its output parsed into the ``tool_calls`` column (null for rows without tools).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.deployments.data_rows import (
    ERROR_COLUMN,
    PROMPT_KEY,
    Postprocess,
    RowError,
    prompt_key,
    sort_window,
)
from sgl_ray.deployments.data_stage import (
    OUTPUT_COLUMNS,
    EngineStage,
    Progress,
    tool_calls_type,
)
from sgl_ray.errors import InvalidRequestError

if TYPE_CHECKING:
    import ray.data

Row = dict[str, Any]

__all__ = [
    "ERROR_COLUMN",
    "OUTPUT_COLUMNS",
    "PROMPT_KEY",
    "Processor",
    "ProcessorConfig",
    "Progress",
    "RowError",
    "build_processor",
    "prompt_key",
    "tool_calls_type",
]


@dataclass(frozen=True)
class ProcessorConfig:
    """How the processor runs (Ray Data LLM's names where it has one).

    - ``model_source``: the model (a path, a hub id or a ``.gguf`` file); the same as ``engine_kwargs["model_path"]``.
      Neither: the embedded default model.
    - ``engine_kwargs``: :class:`~sgl_ray.EngineArgs` fields (``tp_size``, ``max_total_tokens``, …).
    - ``concurrency``: engine actors: ``n`` (a fixed pool) or ``(min, max)`` (an autoscaling pool).
    - ``batch_size`` rows go to an engine at once, up to ``max_concurrent_batches`` batches per engine.
    - ``apply_chat_template`` (Ray: ``chat_template_stage``, a bool or ``{"enabled", "chat_template_kwargs"}``):
      render ``messages`` rows with the model's chat template; on by default.
    - ``has_image`` (Ray's older flag) or ``prepare_multimodal_stage`` (its newer stage config: a bool or
      ``{"enabled": ...}``): rows carry images. Image rows work on a vision-language model without them; with
      them, an engine whose model takes no images fails at start-up instead of failing every image row.
    - ``should_continue_on_error``: a failing row gets its error in ``__inference_error__`` ("" for good rows)
      and default outputs, skips ``postprocess``, and the job goes on; off: the job fails naming the row.
    - ``order_by_prefix``: sort each window of ``prefix_window`` rows by prompt (module docstring).
    - ``log_interval_s``: each engine actor logs its progress after its first batch, then this often (0: never).
    - ``num_cpus``/``num_gpus`` are reserved per engine actor; ``num_gpus=None`` means 1 when the cluster (or,
      before ``ray.init``, this machine) has a GPU and the engine runs in this actor, else 0 (with
      ``tp_size``/``pp_size``/``dp_size`` > 1 the engine's own actor group reserves the devices);
      ``accelerator_type`` and ``runtime_env`` go to the engine actors as Ray Data's ``map_batches`` takes them.
    """

    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    concurrency: int | tuple[int, int] = 1
    batch_size: int = 32
    max_concurrent_batches: int = 4
    apply_chat_template: bool = True
    order_by_prefix: bool = True
    num_cpus: float = 1.0
    num_gpus: float | None = None
    model_source: str | None = None
    should_continue_on_error: bool = False
    chat_template_stage: bool | Mapping[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    has_image: bool = False
    prepare_multimodal_stage: bool | Mapping[str, Any] | None = None
    prefix_window: int = 4096
    log_interval_s: float = 10.0
    accelerator_type: str | None = None
    runtime_env: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_concurrent_batches", "prefix_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidRequestError(f"{name}: must be an integer >= 1", param=name)
        self.pool_size()  # validates concurrency
        if self.log_interval_s < 0:
            raise InvalidRequestError(
                "log_interval_s: must be >= 0 (0: no progress log)", param="log_interval_s"
            )
        stage = self.chat_template_stage
        if isinstance(stage, Mapping) and set(stage) - {"enabled", "chat_template_kwargs"}:
            unknown = sorted(set(stage) - {"enabled", "chat_template_kwargs"})
            raise InvalidRequestError(
                f"chat_template_stage: only `enabled` and `chat_template_kwargs` are read, got {unknown}",
                param="chat_template_stage",
            )
        stage = self.prepare_multimodal_stage
        if isinstance(stage, Mapping) and set(stage) - {"enabled"}:
            raise InvalidRequestError(
                f"prepare_multimodal_stage: only `enabled` is read, got {sorted(set(stage) - {'enabled'})}",
                param="prepare_multimodal_stage",
            )
        path = self.engine_kwargs.get("model_path")
        if self.model_source is not None and path is not None and path != self.model_source:
            raise InvalidRequestError(
                f"model_source={self.model_source!r} and engine_kwargs['model_path']={path!r} differ: give one",
                param="model_source",
            )

    def pool_size(self) -> dict[str, int]:
        """``ray.data.ActorPoolStrategy`` sizes: ``{"size": n}`` or ``{"min_size": m, "max_size": n}``.

        >>> ProcessorConfig(concurrency=(1, 3)).pool_size()
        {'min_size': 1, 'max_size': 3}
        """
        c = self.concurrency
        if isinstance(c, int) and not isinstance(c, bool) and c >= 1:
            return {"size": c}
        if (
            isinstance(c, (tuple, list))
            and len(c) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in c)
            and 1 <= c[0] <= c[1]
        ):
            return {"min_size": c[0], "max_size": c[1]}
        raise InvalidRequestError(
            f"concurrency: an integer >= 1 or a (min, max) pair with 1 <= min <= max, got {c!r}",
            param="concurrency",
        )

    @property
    def chat_template(self) -> tuple[bool, dict[str, Any] | None]:
        """``(apply it, template kwargs)``: ``chat_template_stage`` where given, else ``apply_chat_template``."""
        stage = self.chat_template_stage
        if stage is None:
            return self.apply_chat_template, self.chat_template_kwargs
        if isinstance(stage, Mapping):
            kwargs = stage.get("chat_template_kwargs", self.chat_template_kwargs)
            return bool(stage.get("enabled", True)), kwargs
        return bool(stage), self.chat_template_kwargs

    @property
    def images(self) -> bool:
        """Whether rows carry images (``has_image`` or an enabled ``prepare_multimodal_stage``)."""
        stage = self.prepare_multimodal_stage
        enabled = bool(stage.get("enabled", True)) if isinstance(stage, Mapping) else bool(stage)
        return self.has_image or enabled

    @property
    def engine_kwargs_with_model(self) -> dict[str, Any]:
        """``engine_kwargs`` with ``model_source`` as ``model_path``."""
        if self.model_source is None:
            return dict(self.engine_kwargs)
        return {**self.engine_kwargs, "model_path": self.model_source}

    @property
    def engine_args(self) -> EngineArgs:
        """The engine's arguments, validated (unknown fields raise ``TypeError``)."""
        return EngineArgs(**self.engine_kwargs_with_model)

    def gpus_per_actor(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        if self.engine_args.uses_ray:
            return 0.0
        return 1.0 if _cluster_has_gpu() else 0.0


def _cluster_has_gpu() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) >= 1
    import torch

    return torch.cuda.is_available()


# --- the public builder -------------------------------------------------------------------------------------------


class Processor:
    """A dataset-to-dataset transform; build it with :func:`build_processor` and call it on datasets."""

    def __init__(
        self,
        config: ProcessorConfig,
        preprocess: Callable[[Row], Row] | None = None,
        postprocess: Callable[[Row], Row] | None = None,
        preprocess_map_kwargs: dict[str, Any] | None = None,
        postprocess_map_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.preprocess_map_kwargs = dict(preprocess_map_kwargs or {})
        self.postprocess_map_kwargs = dict(postprocess_map_kwargs or {})
        self.engine_args = config.engine_args  # validated here rather than later, inside the actors
        self.num_gpus = config.gpus_per_actor()

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        import ray.data

        c = self.config
        if not c.order_by_prefix:
            ds = _preserving_order(ds)
        if self.preprocess is not None:
            ds = ds.map(self.preprocess, **self.preprocess_map_kwargs)
        if c.order_by_prefix:
            # The preprocess map's resources, so that Ray Data fuses the two into one task.
            same = {k: v for k, v in self.preprocess_map_kwargs.items() if k in ("num_cpus", "memory")}
            ds = ds.map_batches(sort_window, batch_size=c.prefix_window, batch_format="pyarrow", **same)
            # A sorted window is one block: split it again, so its batches spread over the engine actors.
            ds = ds.repartition(target_num_rows_per_block=c.batch_size)
        apply_template, template_kwargs = c.chat_template
        extra = {
            k: v for k, v in (("accelerator_type", c.accelerator_type), ("runtime_env", c.runtime_env)) if v
        }
        ds = ds.map_batches(
            EngineStage,
            fn_constructor_kwargs={
                "engine_kwargs": c.engine_kwargs_with_model,
                "apply_chat_template": apply_template,
                "max_concurrent_batches": c.max_concurrent_batches,
                "should_continue_on_error": c.should_continue_on_error,
                "chat_template_kwargs": template_kwargs,
                "log_interval_s": c.log_interval_s,
                "require_images": c.images,
            },
            batch_size=c.batch_size,
            batch_format="pyarrow",  # columns the engine does not read pass through untouched
            # Calls per actor: Ray Data keeps that many batches queued at each engine.
            compute=ray.data.ActorPoolStrategy(
                **c.pool_size(), max_concurrent_calls_per_actor=c.max_concurrent_batches
            ),
            num_cpus=c.num_cpus,
            num_gpus=self.num_gpus,
            **extra,
        )
        if self.postprocess is not None:
            post = Postprocess(self.postprocess, c.should_continue_on_error)
            ds = ds.map(post, **self.postprocess_map_kwargs)
        return ds

    def with_config(self, **changes: Any) -> Processor:
        """A copy with some :class:`ProcessorConfig` fields changed."""
        return Processor(
            dataclasses.replace(self.config, **changes),
            self.preprocess,
            self.postprocess,
            self.preprocess_map_kwargs,
            self.postprocess_map_kwargs,
        )


def _preserving_order(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` on its own copy of its Ray Data context, with ``preserve_order`` set: outputs in input order. (The
    context is shared with the datasets ``ds`` came from, and may be the driver's global one: not changed.)"""
    import ray.data

    ds = ray.data.Dataset.copy(ds, _deep_copy=True)
    ds.context.execution_options.preserve_order = True
    return ds


_BUILDER_KWARGS = ("chat_template_kwargs",)


def build_processor(
    config: ProcessorConfig,
    preprocess: Callable[[Row], Row] | None = None,
    postprocess: Callable[[Row], Row] | None = None,
    preprocess_map_kwargs: dict[str, Any] | None = None,
    postprocess_map_kwargs: dict[str, Any] | None = None,
    builder_kwargs: dict[str, Any] | None = None,
) -> Processor:
    """Build a batch-inference :class:`Processor` over a pool of sgl_ray engine actors (``ray.data.llm``'s
    signature; ``ray.data.llm.build_processor`` with a :class:`ProcessorConfig` comes here too).

    ``preprocess(row)`` must give each row a ``prompt`` (text), ``messages`` (a chat, rendered with the model's
    chat template) or ``input_ids``, and optionally ``sampling_params`` (a dict) and images (image content parts
    in ``messages``, or an ``image`` column; see the module docstring). A ``messages`` row may add
    ``tools`` (OpenAI's chat shape; a list, or its JSON text to keep schemas exact through Arrow) and
    ``tool_choice``. Each output row keeps its columns and gains ``generated_text``, ``generated_tokens``,
    ``num_input_tokens``, ``num_generated_tokens``, ``num_cached_tokens``, ``finish_reason``, ``tool_calls`` (the
    calls parsed from the output: ``[{"name", "arguments"}]``, null for rows without tools) and ``time_taken_llm``
    (seconds); then ``postprocess(row)`` shapes it. ``preprocess_map_kwargs``/``postprocess_map_kwargs`` go to
    those stages' ``Dataset.map``; ``builder_kwargs`` may hold ``chat_template_kwargs``.

    Example::

        >>> import ray
        >>> from sgl_ray.deployments.data import ProcessorConfig, build_processor
        >>> processor = build_processor(
        ...     ProcessorConfig(engine_kwargs={"max_total_tokens": 8192}, concurrency=1),
        ...     preprocess=lambda row: {
        ...         "messages": [{"role": "user", "content": row["question"]}],
        ...         "sampling_params": {"temperature": 0.0, "max_new_tokens": 32},
        ...     },
        ...     postprocess=lambda row: {"question": row["messages"][0]["content"], "answer": row["generated_text"]},
        ... )
        >>> ds = processor(ray.data.from_items([{"question": "What is 2+2?"}, {"question": "Name a color."}]))
        >>> for row in ds.take_all():  # doctest: +SKIP
        ...     print(row["question"], "->", row["answer"])
    """
    if not isinstance(config, ProcessorConfig):
        got = f"{type(config).__module__}.{type(config).__qualname__}"
        raise TypeError(f"build_processor: config must be sgl_ray.deployments.ProcessorConfig, got {got}")
    extra = dict(builder_kwargs or {})
    unknown = sorted(set(extra) - set(_BUILDER_KWARGS))
    if unknown:
        raise TypeError(f"build_processor: unknown builder_kwargs {unknown} (known: {list(_BUILDER_KWARGS)})")
    if "chat_template_kwargs" in extra:
        config = dataclasses.replace(config, chat_template_kwargs=extra["chat_template_kwargs"])
    return Processor(config, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs)


def _build_for_ray(config: ProcessorConfig, **kwargs: Any) -> Processor:
    """The builder ``ray.data.llm.build_processor`` calls for a :class:`ProcessorConfig` (its ``builder_kwargs``
    arrive as keyword arguments)."""
    named = ("preprocess", "postprocess", "preprocess_map_kwargs", "postprocess_map_kwargs")
    builder_kwargs = {k: v for k, v in kwargs.items() if k not in named}
    return build_processor(config, **{k: kwargs.get(k) for k in named}, builder_kwargs=builder_kwargs)


def register_with_ray_data_llm() -> bool:
    """Register :class:`ProcessorConfig` in ``ray.data.llm``'s builder registry (``ProcessorBuilder``, keyed by the
    config's class name), so ``ray.data.llm.build_processor(ProcessorConfig(...))`` builds our processor. Done on
    import; returns whether this Ray has the registry."""
    try:
        from ray.llm._internal.batch.processor import ProcessorBuilder
    except ImportError:
        return False
    try:
        ProcessorBuilder.register(ProcessorConfig, _build_for_ray)
    except ValueError:  # registered already (this module imported again): keep the first
        pass
    return True


register_with_ray_data_llm()
