"""The engine stage of the Ray Data processor: one :class:`sgl_ray.Engine` per Ray Data actor, the rows of each
batch submitted together, per-row errors, and a progress line logged from each actor. Rows may carry images
(:func:`~sgl_ray.deployments.data_rows.split_images`); the engine preprocesses them off its event loop.

Each row is its own request (so one bad row fails alone), but all rows of a batch are submitted in the same event
loop turn, so the scheduler sees them together and continuous batching works across them. A row that fails (bad
sampling parameters, a prompt the model cannot take, an engine error) raises :class:`~sgl_ray.deployments.
data_rows.RowError` naming the row, or, with ``should_continue_on_error``, gets its message in the
``__inference_error__`` column and default outputs, and the job goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sgl_ray.deployments.data_rows import (
    ERROR_COLUMN,
    IMAGE_COLUMN,
    RowError,
    describe_row,
    prompt_ids,
    row_tools,
    sampling_params,
    split_images,
    without_nulls,
)
from sgl_ray.errors import InvalidRequestError

if TYPE_CHECKING:
    import pyarrow as pa

Row = dict[str, Any]

logger = logging.getLogger("sgl_ray.data")

INPUT_COLUMNS = ("input_ids", "messages", "prompt", "sampling_params", "tools", "tool_choice", IMAGE_COLUMN)
OUTPUT_COLUMNS = (
    "generated_text",
    "generated_tokens",
    "num_input_tokens",
    "num_generated_tokens",
    "num_cached_tokens",
    "finish_reason",
    "tool_calls",
    "time_taken_llm",
)


@dataclass
class Progress:
    """What one engine actor has done: rows, tokens and the time since its first row. :meth:`line` is the
    progress line each actor logs after its first batch, then every ``log_interval_s``.

    >>> p = Progress(started=100.0)
    >>> p.add_row(prompt=120, cached=100, generated=8)
    >>> p.add_row(prompt=0, cached=0, generated=0, failed=True)
    >>> p.line(now=102.0, in_flight=3)
    '2 rows done (1 failed) in 2.0s: 1.0 rows/s, prompt 60 tok/s (83% cached), generation 4 tok/s; 3 in flight'
    """

    started: float
    rows: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0

    def add_row(self, prompt: int, cached: int, generated: int, failed: bool = False) -> None:
        self.rows += 1
        self.failed += failed
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.generated_tokens += generated

    def line(self, now: float, in_flight: int) -> str:
        elapsed = max(now - self.started, 1e-9)
        cached = 100 * self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (
            f"{self.rows} rows done{failed} in {elapsed:.1f}s: {self.rows / elapsed:.1f} rows/s, "
            f"prompt {self.prompt_tokens / elapsed:.0f} tok/s ({cached:.0f}% cached), "
            f"generation {self.generated_tokens / elapsed:.0f} tok/s; {in_flight} in flight"
        )


def _actor_logger() -> logging.Logger:
    """``sgl_ray.data`` at INFO to this worker's stderr, which Ray forwards to the driver (``log_to_driver``)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class EngineStage:
    """One :class:`sgl_ray.Engine` per actor; the rows of each batch are submitted together, in arrival order.
    ``require_images`` (the config's ``has_image``): refuse, at start-up, a model that takes no images."""

    def __init__(
        self,
        engine_kwargs: dict[str, Any],
        apply_chat_template: bool,
        max_concurrent_batches: int,
        should_continue_on_error: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        log_interval_s: float = 10.0,
        require_images: bool = False,
    ) -> None:
        import sgl_ray
        from sgl_ray.errors import UnsupportedModelError
        from sgl_ray.multimodal.chat import image_placeholder
        from sgl_ray.protocol.tool_prompt import ToolFormat
        from sgl_ray.reasoning import get_reasoning_parser

        self.engine = sgl_ray.Engine(**engine_kwargs)
        takes_images = self.engine.image_processor is not None
        self.image_placeholder = image_placeholder(self.engine.hf_config) if takes_images else None
        if require_images and not takes_images:
            self.engine.shutdown()
            raise UnsupportedModelError(
                f"has_image is set, but {self.engine.model_path!r} takes no image inputs (a text model)"
            )
        self.apply_chat_template = apply_chat_template
        self.chat_template_kwargs = chat_template_kwargs
        self.max_concurrent_batches = max_concurrent_batches
        self.continue_on_error = should_continue_on_error
        self.log_interval_s = log_interval_s
        self._slots: asyncio.Semaphore | None = None  # made in the actor's event loop, on first use
        self._reporter: asyncio.Task | None = None
        self._last_line: tuple[float, int] | None = None  # (when, rows done) of the last progress line
        self.progress: Progress | None = None
        self.in_flight = 0
        args = self.engine.args
        self.tool_format = ToolFormat.for_tokenizer(self.engine.tokenizer, args.tool_call_parser)
        self.reasoning = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None

    # --- one row ------------------------------------------------------------------------------------------------

    def _request(self, row: Row) -> tuple[list[int], Any, Any, list[Any]]:
        """``(prompt ids, sampling params, tool prompt or None, images)`` of one row."""
        params = sampling_params(row.get("sampling_params"))
        tools, tool_choice = row_tools(row)
        row, images = split_images(row, self.image_placeholder)
        if tools is None:
            if tool_choice is not None:
                raise InvalidRequestError("a row's tool_choice needs tools", param="tool_choice")
            return (
                prompt_ids(self.engine.tokenizer, row, self.apply_chat_template, self.chat_template_kwargs),
                params,
                None,
                images,
            )
        if row.get("messages") is None or not self.apply_chat_template:
            raise InvalidRequestError(
                "rows with `tools` need `messages` and the chat template (apply_chat_template=True)",
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
        return prompt.input_ids, prompt.params, prompt, images

    async def _generate(self, batch: pa.Table, i: int, row: Row) -> tuple[dict, Any, float]:
        """``(engine output, tool prompt or None, seconds)`` of row ``i``; its error as a :class:`RowError`."""
        try:
            ids, params, prompt, images = self._request(row)
            started = time.perf_counter()
            out = await self.engine.async_generate(
                input_ids=ids, sampling_params=params, image_data=images or None
            )
        except Exception as e:
            raise RowError.of(describe_row(batch.slice(i, 1).to_pylist()[0]), e) from e
        assert isinstance(out, dict)
        return out, prompt, time.perf_counter() - started

    # --- one batch ----------------------------------------------------------------------------------------------

    async def __call__(self, batch: pa.Table) -> pa.Table:
        from sgl_ray.deployments.data_rows import PROMPT_KEY

        drop = [c for c in (PROMPT_KEY, ERROR_COLUMN, *OUTPUT_COLUMNS) if c in batch.column_names]
        batch = batch.drop_columns(drop)
        if batch.num_rows == 0:
            return batch
        inputs = {c: batch.column(c).to_pylist() for c in INPUT_COLUMNS if c in batch.column_names}
        rows = [{c: values[i] for c, values in inputs.items()} for i in range(batch.num_rows)]
        self._start_reporting()
        assert self._slots is not None
        async with self._slots:
            self.in_flight += len(rows)
            tasks = [asyncio.ensure_future(self._generate(batch, i, r)) for i, r in enumerate(rows)]
            try:  # without should_continue_on_error the first failure fails the batch, and the rest abort
                results = await asyncio.gather(*tasks, return_exceptions=self.continue_on_error)
            finally:
                self.in_flight -= len(rows)
                for t in tasks:  # a failed or cancelled batch: the rest abort (their KV is freed)
                    t.cancel()
        out = self._columns(batch, results)
        self._report()
        return out

    def _columns(self, batch: pa.Table, results: list[Any]) -> pa.Table:
        import pyarrow as pa

        columns: dict[str, list[Any]] = {name: [] for name in (*OUTPUT_COLUMNS, ERROR_COLUMN)}
        assert self.progress is not None
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, RowError):
                    raise result  # cancellation, KeyboardInterrupt: not the row's fault
                _actor_logger().warning("%s", result)
                self.progress.add_row(0, 0, 0, failed=True)
                for name, value in _ERROR_DEFAULTS.items():
                    columns[name].append(value)
                columns[ERROR_COLUMN].append(str(result))
                continue
            out, prompt, seconds = result
            meta = out["meta_info"]
            self.progress.add_row(meta["prompt_tokens"], meta["cached_tokens"], meta["completion_tokens"])
            columns["generated_text"].append(out["text"])
            columns["generated_tokens"].append(list(out["output_ids"]))
            columns["num_input_tokens"].append(meta["prompt_tokens"])
            columns["num_generated_tokens"].append(meta["completion_tokens"])
            columns["num_cached_tokens"].append(meta["cached_tokens"])
            columns["finish_reason"].append((meta["finish_reason"] or {}).get("type"))
            calls = None if prompt is None else [c._asdict() for c in prompt.parse(out["text"]).calls]
            columns["tool_calls"].append(calls)
            columns["time_taken_llm"].append(seconds)
            columns[ERROR_COLUMN].append("")
        types = {
            "generated_tokens": pa.list_(pa.int64()),
            "num_input_tokens": pa.int64(),
            "num_generated_tokens": pa.int64(),
            "num_cached_tokens": pa.int64(),
            "finish_reason": pa.string(),
            "tool_calls": tool_calls_type(),
            "time_taken_llm": pa.float64(),
        }
        for name in OUTPUT_COLUMNS:
            batch = batch.append_column(name, pa.array(columns[name], type=types.get(name)))
        if self.continue_on_error:
            batch = batch.append_column(ERROR_COLUMN, pa.array(columns[ERROR_COLUMN], type=pa.string()))
        return batch

    # --- progress -----------------------------------------------------------------------------------------------

    def _start_reporting(self) -> None:
        """On the first batch (inside the actor's event loop): the batch slots and the progress reporter."""
        if self._slots is not None:
            return
        self._slots = asyncio.Semaphore(self.max_concurrent_batches)
        self.progress = Progress(started=time.perf_counter())
        if self.log_interval_s > 0:
            self._reporter = asyncio.ensure_future(self._report_every(self.log_interval_s))

    async def _report_every(self, interval: float) -> None:
        while True:  # a line while batches are long, too
            await asyncio.sleep(interval)
            self._report()

    def _report(self) -> None:
        """Log the progress line, at most once per ``log_interval_s``; the first finished batch logs at once."""
        now = time.perf_counter()
        if self.progress is None or self.log_interval_s <= 0:
            return
        if self._last_line is not None and now - self._last_line[0] < self.log_interval_s:
            return
        if self._last_line is not None and self._last_line[1] == self.progress.rows and not self.in_flight:
            return  # idle since the last line
        self._last_line = (now, self.progress.rows)
        line = self.progress.line(now, self.in_flight)
        _actor_logger().info("engine actor pid=%d: %s", os.getpid(), line)


# What a failed row's output columns hold (Ray's convention: empty, zero or -1).
_ERROR_DEFAULTS: dict[str, Any] = {
    "generated_text": "",
    "generated_tokens": [],
    "num_input_tokens": 0,
    "num_generated_tokens": 0,
    "num_cached_tokens": 0,
    "finish_reason": None,
    "tool_calls": None,
    "time_taken_llm": -1.0,
}


def tool_calls_type() -> pa.DataType:
    """The ``tool_calls`` column: per row, null (no tools) or a list of ``{name, arguments}`` (arguments: JSON)."""
    import pyarrow as pa

    return pa.list_(pa.struct([("name", pa.string()), ("arguments", pa.string())]))
