"""From replica output streams to HTTP responses: OpenAI-shaped (through the protocol's assemblers) and the native
``/generate`` shape, streamed as SSE or whole; plus the ingress's small HTTP helpers and per-request latency record.

Every function here takes an async iterator of ``(choice index, RequestOutput)`` and closes it when done, so a
client that disconnects cancels its replica stream (aborting the requests and freeing their KV).
"""

from __future__ import annotations

import time
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


async def assembled_response(
    assembler, outputs: AsyncIterator, stream: bool, tracker: Latency, record: Callable[[Latency], None]
) -> Response:
    """An OpenAI response from ``assembler`` (a protocol response builder, or a stream assembler when ``stream``);
    ``record(tracker)`` runs once the request completed. A stream assembler's ``framing()`` (if it has one) says
    how its events are written; chat's ``data:`` events and ``[DONE]`` otherwise."""
    if not stream:
        async for index, out in outputs:
            tracker.saw(out)
            assembler.add(index, out)
        record(tracker)
        return json_response(P.encode(assembler.build()))
    framing: P.SSEFraming = assembler.framing() if hasattr(assembler, "framing") else P.CHAT_SSE

    async def events() -> AsyncIterator[bytes]:
        try:
            for chunk in getattr(assembler, "start", list)():
                yield framing.event(chunk)
            async for index, out in outputs:
                tracker.saw(out)
                for chunk in assembler.add(index, out):
                    yield framing.event(chunk)
            for chunk in assembler.finish():
                yield framing.event(chunk)
            if framing.done:
                yield framing.done
            record(tracker)
        except SglRayError as e:
            yield framing.error(e)
            if framing.done:
                yield framing.done
        finally:
            await outputs.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")


class NativeResult:
    """``/generate`` results in the engine's own shape (cumulative in the end, per-chunk deltas when streamed).
    With a ``reasoning`` parser class, ``text`` is the answer and ``reasoning_text`` the reasoning."""

    def __init__(self, return_logprob: bool, reasoning: type[ReasoningParser] | None = None) -> None:
        self.builder: ResultBuilder | None = None
        self.return_logprob = return_logprob
        self.reasoning = reasoning() if reasoning is not None else None

    def add(self, out: RequestOutput) -> dict[str, Any]:
        if self.builder is None:
            self.builder = ResultBuilder(out.rid, self.return_logprob)
        self.builder.add(out)
        chunk = self.builder.chunk(out)
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
        assert self.builder is not None
        result = self.builder.result()
        if self.reasoning is not None:
            split = type(self.reasoning)().parse(result["text"])
            result["text"], result["reasoning_text"] = split.content, split.reasoning
        return result


async def native_response(
    streams: list[tuple[int, AsyncIterator]],
    results: list[NativeResult],
    stream: bool,
    batch: bool,
    tracker: Latency,
) -> Response:
    """The ``/generate`` response over several replica streams: ``streams`` holds ``(first result index, outputs)``
    per call, ``results`` one :class:`NativeResult` per prompt × sample. Whole: one result, or a list for a batch
    request; streamed: SSE events of per-chunk deltas, calls one after another."""
    if not stream:
        for base, outs in streams:
            async for index, out in outs:
                tracker.saw(out)
                results[base + index].add(out)
        body = [r.result() for r in results]
        return json_response(msgspec.json.encode(body if batch or len(body) > 1 else body[0]))

    async def events() -> AsyncIterator[bytes]:
        for base, outs in streams:
            try:
                async for index, out in outs:
                    yield P.sse_event(results[base + index].add(out))
            except SglRayError as e:
                yield P.sse_error(e)
                break
            finally:
                await outs.aclose()
        yield P.SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")
