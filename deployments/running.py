"""The requests an ingress replica is streaming, by request id, so that ``POST /abort_request`` can end them.

Invariant: an aborted request still gets a complete response. Aborting cancels its replica streams (the replica
aborts the engine requests and frees their KV); :func:`abortable` then ends every choice that had not finished with
``finish_reason: {"type": "abort"}``, so the client reads what was generated so far, a ``finish_reason`` of
``"abort"`` and, when streaming, ``[DONE]`` — never a cut connection.

Scope: one ingress replica. With several ingress replicas (``ingress_replicas``), an abort reaches the replica
Serve's proxy sends it to, which knows only its own requests.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

from sgl_ray.deployments.responses import unwrap
from sgl_ray.errors import InvalidRequestError, SglRayError
from sgl_ray.scheduler.output import RequestOutput

ABORTED = {"type": "abort", "message": "Aborted by /abort_request."}


class Running:
    """One request: its id, whether it was aborted, and its open replica streams."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.aborted = False
        self._streams: set[Any] = set()

    def attach(self, stream: Any) -> None:
        self._streams.add(stream)
        if self.aborted:
            stream.cancel()

    def detach(self, stream: Any) -> None:
        self._streams.discard(stream)

    def abort(self) -> None:
        self.aborted = True
        for stream in list(self._streams):
            stream.cancel()


class RunningRequests:
    """``rid → Running`` for the requests in flight on this ingress replica.

    Example::

        >>> running = RunningRequests()
        >>> r = running.start("my-request")
        >>> running.abort("my-request"), r.aborted
        (True, True)
        >>> running.finish(r); running.abort("my-request")
        False
    """

    def __init__(self) -> None:
        self._by_rid: dict[str, Running] = {}

    def start(self, rid: str | None) -> Running:
        """Track a new request: under the client's ``rid`` (a 400 if one with that id is running), else under a
        fresh id."""
        if rid is not None and rid in self._by_rid:
            raise InvalidRequestError(f"A request with rid '{rid}' is already running.", param="rid")
        running = Running(rid if rid is not None else uuid.uuid4().hex)
        self._by_rid[running.rid] = running
        return running

    def finish(self, running: Running) -> None:
        if self._by_rid.get(running.rid) is running:
            del self._by_rid[running.rid]

    def abort(self, rid: str) -> bool:
        """Abort the request ``rid``; False if no such request is running here."""
        running = self._by_rid.get(rid)
        if running is None:
            return False
        running.abort()
        return True

    def abort_all(self) -> int:
        """Abort every request; returns how many."""
        for running in self._by_rid.values():
            running.abort()
        return len(self._by_rid)


class Rejected(NamedTuple):
    """A replica's answer that the request itself is at fault (an ``SglRayError`` with a 4xx status), sent down its
    stream as a value: raised in the replica, Ray Serve would log it with a traceback at ERROR and count a failed
    request. :func:`abortable` raises the error on the ingress's side."""

    error: SglRayError

    @staticmethod
    def of(e: BaseException) -> Rejected | None:
        """``e`` (or the user's exception a Ray task error carries) as a rejection when it is the user's error, else
        None."""
        cause = unwrap(e)
        return Rejected(cause) if isinstance(cause, SglRayError) and 400 <= cause.status_code < 500 else None


async def abortable(
    stream: Any,
    running: Running,
    prompts: Sequence[Sequence[int]],
    n: int,
    last: dict[int, RequestOutput] | None = None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(choice index, output)`` from a replica ``stream`` (a Serve response generator of ``prompts`` × ``n``
    choices); once ``running`` is aborted, the choices that had not finished end with an ``abort`` output. Closing
    the iterator cancels the stream. ``last``: each choice's last output so far, kept up to date here (a resumed
    request passes the one dict to each of its streams, so an abort ends only the choices still unfinished)."""
    last = {} if last is None else last
    running.attach(stream)
    try:
        try:
            async for item in stream:
                if isinstance(item, Rejected):
                    raise item.error
                index, out = item
                last[index] = out
                yield index, out
        except Exception:
            if not running.aborted:
                raise
        if not running.aborted:
            return
        for index in range(len(prompts) * n):
            prev = last.get(index)
            if prev is None or not prev.finished:
                yield index, _aborted(prev, running.rid, len(prompts[index // n]))
    finally:
        running.detach(stream)
        stream.cancel()


def _aborted(prev: RequestOutput | None, rid: str, prompt_len: int) -> RequestOutput:
    return RequestOutput(
        rid=prev.rid if prev is not None else rid,
        token_ids=[],
        text="",
        finished=True,
        finish_reason=dict(ABORTED),
        prompt_tokens=prev.prompt_tokens if prev is not None else prompt_len,
        completion_tokens=prev.completion_tokens if prev is not None else 0,
        cached_tokens=prev.cached_tokens if prev is not None else 0,
    )
