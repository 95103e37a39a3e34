"""Ray Data batch inference: ``build_processor`` turns a :class:`ray.data.Dataset` of prompts into one of
completions, in the style of ``ray.data.llm.build_processor``, with a pool of :class:`sgl_ray.Engine` actors.

The pipeline (lazy, like every Ray Data transform)::

    ds.map(preprocess + sort key) ─▶ ds.sort(key) ─▶ ds.map_batches(engine actors) ─▶ ds.map(postprocess)
                                     └ order_by_prefix ┘    async, `concurrency` actors

Prefix-aware ordering: sorting the rows by their prompts puts prompts that share a prefix next to each other, so
they land in the same batches and, because Ray Data's sort range-partitions the rows, on the same engine actor.
That actor's radix cache then computes each shared prefix about once; in input order every batch (and every actor)
may hold a slice of every prefix family, and under KV pressure they evict each other and are computed again and
again. The key (:func:`prompt_key`) needs no tokenizer: ``input_ids`` as big-endian ``uint32`` bytes, text as UTF-8,
``messages`` as their roles and contents — a shared leading span of text is a shared leading span of key bytes.
The cost: Ray Data's sort is an all-to-all exchange, so generation starts once every row is preprocessed (the
engine actors load their models meanwhile), and output rows come in prompt order, not input order (carry an id
column to join back). With ``order_by_prefix=False`` rows stream through in input order.

Each engine actor runs up to ``max_concurrent_batches`` batches at once (all rows of a batch are submitted
together), so continuous batching overlaps the tail of one batch with the next.

Tools: a ``messages`` row with ``tools`` (OpenAI's chat shape, a list or its JSON text) and optionally
``tool_choice`` is rendered and planned as ``/v1/chat/completions`` does (``required`` or a named function forces
the call format), and its output parsed into the ``tool_calls`` column (null for rows without tools).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.deployments.data_rows import prompt_ids, prompt_key, row_tools, sampling_params, without_nulls
from sgl_ray.errors import InvalidRequestError

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

Row = dict[str, Any]

PROMPT_KEY = (
    "__sgl_prompt_key"  # internal column: the rows' prompt_key, sorted on, dropped by the engine stage
)
_INPUT_COLUMNS = ("input_ids", "messages", "prompt", "sampling_params", "tools", "tool_choice")
OUTPUT_COLUMNS = (
    "generated_text",
    "generated_tokens",
    "num_input_tokens",
    "num_generated_tokens",
    "num_cached_tokens",
    "finish_reason",
    "tool_calls",
)


@dataclass(frozen=True)
class ProcessorConfig:
    """How the processor runs.

    ``engine_kwargs`` are :class:`~sgl_ray.EngineArgs` fields (``model_path``, ``tp_size``, ``pp_size``,
    ``max_total_tokens``, …); ``concurrency`` engine actors each hold one engine; ``batch_size`` rows go to an
    engine at once, up to ``max_concurrent_batches`` batches per engine. ``num_cpus``/``num_gpus`` are reserved per
    engine actor; ``num_gpus=None`` means 1 when the cluster (or, before ``ray.init``, this machine) has a GPU and
    the engine runs in this actor, else 0 (with ``tp_size``/``pp_size``/``dp_size`` > 1 the engine's own actor
    group reserves the devices).
    """

    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    batch_size: int = 32
    max_concurrent_batches: int = 4
    apply_chat_template: bool = False
    order_by_prefix: bool = True
    num_cpus: float = 1.0
    num_gpus: float | None = None

    def __post_init__(self) -> None:
        for name in ("concurrency", "batch_size", "max_concurrent_batches"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name}: must be >= 1", param=name)

    @property
    def engine_args(self) -> EngineArgs:
        """The engine's arguments, validated (unknown fields raise ``TypeError``)."""
        return EngineArgs(**self.engine_kwargs)

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


# --- stages (callable classes: one instance per Ray Data actor) -----------------------------------------------------


class _Preprocess:
    """``preprocess`` (if any), then the :func:`prompt_key` column when the dataset is to be sorted."""

    def __init__(self, preprocess: Callable[[Row], Row] | None, add_key: bool) -> None:
        self.preprocess = preprocess
        self.add_key = add_key

    def __call__(self, row: Row) -> Row:
        if self.preprocess is not None:
            row = self.preprocess(row)
        return {**row, PROMPT_KEY: prompt_key(row)} if self.add_key else row


class _EngineStage:
    """One :class:`sgl_ray.Engine` per actor; each batch is submitted at once, in the order it arrives."""

    def __init__(
        self, engine_kwargs: dict[str, Any], apply_chat_template: bool, max_concurrent_batches: int
    ) -> None:
        import sgl_ray
        from sgl_ray.protocol.tool_prompt import ToolFormat
        from sgl_ray.reasoning import get_reasoning_parser

        self.engine = sgl_ray.Engine(**engine_kwargs)
        self.apply_chat_template = apply_chat_template
        self.max_concurrent_batches = max_concurrent_batches
        self._slots: asyncio.Semaphore | None = None  # made in the actor's event loop, on first use
        args = self.engine.args
        self.tool_format = ToolFormat.for_tokenizer(self.engine.tokenizer, args.tool_call_parser)
        self.reasoning = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None

    def _request(self, row: Row) -> tuple[list[int], Any, Any]:
        """``(prompt ids, sampling params, tool prompt or None)`` of one row."""
        params = sampling_params(row.get("sampling_params"))
        tools, tool_choice = row_tools(row)
        if tools is None:
            if tool_choice is not None:
                raise InvalidRequestError("a row's tool_choice needs tools", param="tool_choice")
            return prompt_ids(self.engine.tokenizer, row, self.apply_chat_template), params, None
        if row.get("messages") is None or not self.apply_chat_template:
            raise InvalidRequestError(
                "rows with `tools` need `messages` and ProcessorConfig(apply_chat_template=True)",
                param="tools",
            )
        from sgl_ray.entrypoints.requests import to_sampling_params
        from sgl_ray.protocol.tool_prompt import tool_prompt

        messages = [without_nulls(dict(m)) for m in row["messages"]]
        prompt = tool_prompt(
            self.engine.tokenizer,
            self.tool_format,
            messages,
            tools,
            to_sampling_params(params),
            tool_choice=tool_choice,
            reasoning=self.reasoning,
        )
        return prompt.input_ids, prompt.params, prompt

    async def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        batch = batch.drop_columns([c for c in (PROMPT_KEY, *OUTPUT_COLUMNS) if c in batch.column_names])
        inputs = {c: batch.column(c).to_pylist() for c in _INPUT_COLUMNS if c in batch.column_names}
        rows = [{c: values[i] for c, values in inputs.items()} for i in range(batch.num_rows)]
        if not rows:
            return batch
        token_lists, params, prompts = zip(*(self._request(r) for r in rows), strict=True)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent_batches)
        async with self._slots:
            outs = await self.engine.async_generate(input_ids=list(token_lists), sampling_params=list(params))
        assert isinstance(outs, list)
        meta = [o["meta_info"] for o in outs]
        columns = {
            "generated_text": [o["text"] for o in outs],
            "generated_tokens": [list(o["output_ids"]) for o in outs],
            "num_input_tokens": [m["prompt_tokens"] for m in meta],
            "num_generated_tokens": [m["completion_tokens"] for m in meta],
            "num_cached_tokens": [m["cached_tokens"] for m in meta],
            "finish_reason": [(m["finish_reason"] or {}).get("type") for m in meta],
        }
        for name, values in columns.items():
            batch = batch.append_column(name, pa.array(values))
        calls = [
            None if p is None else [c._asdict() for c in p.parse(o["text"]).calls]
            for p, o in zip(prompts, outs, strict=True)
        ]
        return batch.append_column("tool_calls", pa.array(calls, type=tool_calls_type()))


def tool_calls_type() -> pa.DataType:
    """The ``tool_calls`` column: per row, null (no tools) or a list of ``{name, arguments}`` (arguments: JSON)."""
    import pyarrow as pa

    return pa.list_(pa.struct([("name", pa.string()), ("arguments", pa.string())]))


# --- the public builder -------------------------------------------------------------------------------------------


class Processor:
    """A dataset-to-dataset transform; build it with :func:`build_processor` and call it on datasets."""

    def __init__(
        self,
        config: ProcessorConfig,
        preprocess: Callable[[Row], Row] | None = None,
        postprocess: Callable[[Row], Row] | None = None,
    ) -> None:
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.engine_args = config.engine_args  # validated here rather than later, inside the actors
        self.num_gpus = config.gpus_per_actor()

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        import ray.data

        c = self.config
        if self.preprocess is not None or c.order_by_prefix:
            ds = ds.map(_Preprocess(self.preprocess, add_key=c.order_by_prefix))
        if c.order_by_prefix:
            ds = ds.sort(PROMPT_KEY)
        ds = ds.map_batches(
            _EngineStage,
            fn_constructor_kwargs={
                "engine_kwargs": c.engine_kwargs,
                "apply_chat_template": c.apply_chat_template,
                "max_concurrent_batches": c.max_concurrent_batches,
            },
            batch_size=c.batch_size,
            batch_format="pyarrow",  # columns the engine does not read pass through untouched
            # Calls per actor: Ray Data keeps that many batches queued at each engine.
            compute=ray.data.ActorPoolStrategy(
                size=c.concurrency, max_concurrent_calls_per_actor=c.max_concurrent_batches
            ),
            num_cpus=c.num_cpus,
            num_gpus=self.num_gpus,
        )
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds

    def with_config(self, **changes: Any) -> Processor:
        """A copy with some :class:`ProcessorConfig` fields changed."""
        return Processor(dataclasses.replace(self.config, **changes), self.preprocess, self.postprocess)


def build_processor(
    config: ProcessorConfig,
    preprocess: Callable[[Row], Row] | None = None,
    postprocess: Callable[[Row], Row] | None = None,
) -> Processor:
    """Build a batch-inference :class:`Processor` over a pool of sgl_ray engine actors.

    ``preprocess(row)`` must give each row a ``prompt`` (text), ``messages`` (a chat, rendered with the model's
    chat template when ``config.apply_chat_template``) or ``input_ids``, and optionally ``sampling_params`` (a
    dict). A ``messages`` row may add ``tools`` (OpenAI's chat shape; a list, or its JSON text to keep schemas
    exact through Arrow) and ``tool_choice``. Each output row keeps its columns and gains ``generated_text``,
    ``generated_tokens``, ``num_input_tokens``, ``num_generated_tokens``, ``num_cached_tokens``, ``finish_reason``
    and ``tool_calls`` (the calls parsed from the output: ``[{"name", "arguments"}]``, null for rows without
    tools); then ``postprocess(row)`` shapes it.

    Example::

        >>> import ray
        >>> from sgl_ray.deployments.data import ProcessorConfig, build_processor
        >>> processor = build_processor(
        ...     ProcessorConfig(engine_kwargs={"max_total_tokens": 8192}, concurrency=1, apply_chat_template=True),
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
    return Processor(config, preprocess, postprocess)
