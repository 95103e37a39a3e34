"""From replica output streams to replies: OpenAI-shaped (through the protocol's assemblers) and the native
``/generate`` shape, whole or streamed, written to HTTP (JSON or SSE) or handed to a Python caller; plus the
ingress's small HTTP helpers and per-request latency record.

Every reply takes async iterators of ``(choice index, RequestOutput)`` and closes them when done, so a client that
disconnects cancels its replica stream (aborting the requests and freeing their KV).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.responses import Response, StreamingResponse

from sgl_ray import protocol as P
from sgl_ray.entrypoints.requests import ResultBuilder
from sgl_ray.errors import SglRayError
from sgl_ray.reasoning import ReasoningParser
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.output import RequestOutput

JSON = "application/json"
logger = logging.getLogger(__name__)


class HTTPError(SglRayError):
    """An error with an explicit HTTP status and OpenAI error type (401, 404 route, 405, 413, 503 …)."""

    def __init__(self, status: int, message: str, error_type: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status_code, self.error_type = status, error_type


def json_response(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type=JSON)


def unwrap(e: BaseException) -> BaseException:
    """Serve re-raises a replica's exception as a RayTaskError; return the user's exception."""
    return getattr(e, "cause", None) or e


class Latency:
    """TTFT, inter-token gaps and token counts of one HTTP request."""

    def __init__(self, started: float) -> None:
        self.started = self.last = started
        self.ttft: float | None = None
        self.itls: list[float] = []
        self._prompt: dict[str, tuple[int, int]] = {}
        self._generated = 0

    def saw(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.token_ids:
            if self.ttft is None:
                self.ttft = now - self.started
            else:
                self.itls.append(now - self.last)
            self.last = now
            self._generated += len(out.token_ids)
        self._prompt[out.rid] = (out.prompt_tokens, out.cached_tokens)

    @property
    def usage(self) -> tuple[int, int, int]:
        """``(prompt tokens, cached prompt tokens, generated tokens)``."""
        return (
            sum(p for p, _ in self._prompt.values()),
            sum(c for _, c in self._prompt.values()),
            self._generated,
        )


async def primed(outputs: AsyncIterator, stream: bool | None, params: SamplingParams) -> AsyncIterator:
    """For a streamed request with a grammar, wait for its first output before the response starts, so that a
    grammar the engine rejects (it is compiled asynchronously) is still an HTTP 400, not an error event."""
    if not stream or params.grammar is None:
        return outputs
    try:
        first = await anext(outputs)
    except BaseException:
        await outputs.aclose()
        raise

    async def chained() -> AsyncIterator:
        try:
            yield first
            async for item in outputs:
                yield item
        finally:
            await outputs.aclose()

    return chained()


class Reply(ABC):
    """One request's answer, before it is written out: to HTTP (:meth:`http`: JSON, or SSE events) or to a Python
    caller of the app's handle API (:meth:`python`: a dict, or an async iterator of chunk dicts) — the same objects
    either way, so both APIs give the same answers.

    Invariant: :meth:`whole` and :meth:`events` close the replica streams when they end, whatever the reason, so a
    client that goes away cancels its requests (aborting them and freeing their KV); the :meth:`on_close`
    callbacks then run once.
    """

    framing: P.SSEFraming = P.CHAT_SSE

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the reply is finished with (written, failed or abandoned)."""
        self._on_close.append(callback)

    @abstractmethod
    async def _whole(self) -> Any: ...

    @abstractmethod
    def _events(self) -> AsyncIterator[Any]: ...

    async def whole(self) -> Any:
        """The response body (a msgspec Struct, or plain data)."""
        try:
            return await self._whole()
        finally:
            self._close()

    async def events(self) -> AsyncIterator[Any]:
        """The streamed events; a failure after the stream started raises its :class:`SglRayError`."""
        events = self._events()
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # at once, not when collected: it cancels the replica streams
            self._close()

    def _close(self) -> None:
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()

    async def http(self) -> Response:
        if not self.stream:
            return json_response(P.encode(await self.whole()))
        framing = self.framing

        async def sse() -> AsyncIterator[bytes]:
            events = self.events()
            try:
                async for event in events:
                    yield framing.event(event)
            except SglRayError as e:
                yield framing.error(e)
            except Exception:  # after the 200 went out: still an error event and the end, never a silent cut
                logger.exception("stream failed")
                yield framing.error(HTTPError(500, "Internal server error", "internal_error"))
            finally:
                await events.aclose()
            if framing.done:
                yield framing.done

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def python(self) -> Any:
        """The body as plain data, or (streaming) an async iterator of event dicts."""
        if not self.stream:
            return msgspec.to_builtins(await self.whole())

        async def dicts() -> AsyncIterator[Any]:
            events = self.events()
            try:
                async for event in events:
                    yield msgspec.to_builtins(event)
            finally:
                await events.aclose()

        return dicts()


class AssembledReply(Reply):
    """An OpenAI-shaped reply from ``assembler`` (a protocol response builder, or a stream assembler when
    ``stream``); ``record(tracker)`` runs once the request completed. A stream assembler's ``framing()`` (if it
    has one) says how its events are written; chat's ``data:`` events and ``[DONE]`` otherwise."""

    def __init__(
        self,
        assembler: Any,
        outputs: AsyncIterator,
        stream: bool,
        tracker: Latency,
        record: Callable[[Latency], None],
    ) -> None:
        super().__init__(stream)
        self.assembler, self.outputs, self.tracker, self.record = assembler, outputs, tracker, record
        if stream and hasattr(assembler, "framing"):
            self.framing = assembler.framing()

    async def _whole(self) -> Any:
        try:
            async for index, out in self.outputs:
                self.tracker.saw(out)
                self.assembler.add(index, out)
        finally:
            await self.outputs.aclose()
        self.record(self.tracker)
        return self.assembler.build()

    async def _events(self) -> AsyncIterator[Any]:
        try:
            for chunk in getattr(self.assembler, "start", list)():
                yield chunk
            async for index, out in self.outputs:
                self.tracker.saw(out)
                for chunk in self.assembler.add(index, out):
                    yield chunk
            for chunk in self.assembler.finish():
                yield chunk
            self.record(self.tracker)
        finally:
            await self.outputs.aclose()


class NativeResult:
    """``/generate`` results in the engine's own shape (cumulative in the end, per-chunk deltas when streamed).
    With a ``reasoning`` parser class, ``text`` is the answer and ``reasoning_text`` the reasoning. ``meta_info``
    also has SGLang's ``matched_stop`` (the stop string, stop-regex pattern or token id that ended it; null
    otherwise) and, when the client named the request, its ``rid`` as ``id``."""

    def __init__(
        self, return_logprob: bool, reasoning: type[ReasoningParser] | None = None, rid: str | None = None
    ) -> None:
        self.builder: ResultBuilder | None = None
        self.return_logprob = return_logprob
        self.reasoning = reasoning() if reasoning is not None else None
        self.rid = rid

    def _meta(self, result: dict[str, Any], out: RequestOutput) -> dict[str, Any]:
        result["meta_info"]["matched_stop"] = P.matched_stop(out.finish_reason) if out.finished else None
        if self.rid is not None:
            result["meta_info"]["id"] = self.rid
        return result

    def add(self, out: RequestOutput) -> dict[str, Any]:
        if self.builder is None:
            self.builder = ResultBuilder(out.rid, self.return_logprob)
        self.builder.add(out)
        chunk = self._meta(self.builder.chunk(out), out)
        if self.reasoning is not None:
            split = self.reasoning.feed(out.text)
            if out.finished:
                tail = self.reasoning.flush()
                split = split._replace(
                    reasoning=split.reasoning + tail.reasoning, content=split.content + tail.content
                )
            chunk["text"], chunk["reasoning_text"] = split.content, split.reasoning
        return chunk

    def result(self) -> dict[str, Any]:
        assert self.builder is not None and self.builder.last is not None
        result = self._meta(self.builder.result(), self.builder.last)
        if self.reasoning is not None:
            split = type(self.reasoning)().parse(result["text"])
            result["text"], result["reasoning_text"] = split.content, split.reasoning
        return result


class NativeReply(Reply):
    """The ``/generate`` reply over several replica streams: ``streams`` holds ``(first result index, outputs)``
    per call, ``results`` one :class:`NativeResult` per prompt × sample. Whole: one result, or a list for a batch
    request; streamed: per-chunk deltas, calls one after another. ``record(tracker)`` runs once it completed."""

    def __init__(
        self,
        streams: list[tuple[int, AsyncIterator]],
        results: list[NativeResult],
        stream: bool,
        batch: bool,
        tracker: Latency,
        record: Callable[[Latency], None],
    ) -> None:
        super().__init__(stream)
        self.streams, self.results, self.batch = streams, results, batch
        self.tracker, self.record = tracker, record

    async def _whole(self) -> Any:
        try:
            for base, outs in self.streams:
                async for index, out in outs:
                    self.tracker.saw(out)
                    self.results[base + index].add(out)
        finally:
            for _, outs in self.streams:
                await outs.aclose()
        self.record(self.tracker)
        body = [r.result() for r in self.results]
        return body if self.batch or len(body) > 1 else body[0]

    async def _events(self) -> AsyncIterator[Any]:
        try:
            for base, outs in self.streams:
                async for index, out in outs:
                    self.tracker.saw(out)
                    yield self.results[base + index].add(out)
            self.record(self.tracker)
        finally:
            for _, outs in self.streams:
                await outs.aclose()
