"""Requests that outlive the ``LLMServer`` replica serving them.

Inside a replica, a dead shard or scheduler actor is replaced and its requests resume from the tokens they
produced (see ``docs/ray.md``). This module does the same one level up, between the ingress and the replicas:

* The ingress (:meth:`Resumer.stream`) keeps, per choice, the tokens already handed to the client. When the
  replica stream fails because the replica is gone (its actor died or is unreachable, or its engine died), it
  sends the unfinished choices again — to another replica, or to the restarted one — each with a
  :class:`ResumePoint`: the tokens the client has, and the request id and counters to continue.
* The replica (:func:`astream_resumed`) enqueues each as a request whose ``output_ids`` are those tokens, as the
  scheduler does after a preemption: prompt + tokens are prefilled (from the prefix cache where it has them),
  the detokenizer and stop strings are primed with their text without emitting it again, penalties and grammars
  see them, and ``max_new_tokens`` counts them. So the client reads one stream; a greedy request's tokens are
  exactly those of an uninterrupted run, a sampled one continues with a fresh draw.

Invariant: a request whose replica died either continues or ends with an error the client can read — a 503 JSON
body before a response started, else an SSE error event followed by ``[DONE]``; never a silent cut. It ends so
when no replica produced its next output within :attr:`ResumePolicy.timeout_s` of the loss, or when it has lost
more than :attr:`ResumePolicy.max_resumes` distinct replicas (a request that kills each replica it lands on must
not take the whole deployment down with it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from ray.exceptions import RayActorError

from sgl_ray.deployments.responses import HTTPError, unwrap
from sgl_ray.deployments.running import Running, abortable
from sgl_ray.entrypoints.requests import RequestSpec, child_seed
from sgl_ray.errors import EngineDeadError, InvalidRequestError
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.output import RequestOutput

logger = logging.getLogger(__name__)

# Pauses between attempts that got no output (Serve's router may still pick the dead replica for a moment).
_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)


class ResumePoint(msgspec.Struct, frozen=True):
    """Where one choice of an interrupted request stands, as the client has seen it."""

    index: int  # choice index: prompt index * n + sample
    rid: str | None  # the engine request id its outputs carried (None: it had produced nothing)
    output_ids: list[int]  # every token the client has received
    input_logprobs: int = 0  # prompt logprobs already sent
    decode_steps: int = 0
    jump_forward_tokens: int = 0


@dataclass(frozen=True)
class ResumePolicy:
    """``timeout_s``: how long after losing its replica a request may wait for another replica's next output;
    ``max_resumes``: how many distinct replicas one request may lose before it fails (0: never resume)."""

    timeout_s: float = 60.0
    max_resumes: int = 3

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ResumePolicy:
        """From the ingress options ``request_resume_timeout_s`` (a number > 0) and ``max_request_resumes`` (an
        integer >= 0); :class:`~sgl_ray.errors.InvalidRequestError` for any other value."""
        timeout = config.get("request_resume_timeout_s")
        resumes = config.get("max_request_resumes")
        if timeout is None:
            timeout = cls.timeout_s
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise InvalidRequestError(
                f"request_resume_timeout_s must be a number > 0, got {timeout!r}",
                param="request_resume_timeout_s",
            )
        if resumes is None:
            resumes = cls.max_resumes
        elif isinstance(resumes, bool) or not isinstance(resumes, int) or resumes < 0:
            raise InvalidRequestError(
                f"max_request_resumes must be an integer >= 0, got {resumes!r}", param="max_request_resumes"
            )
        return cls(float(timeout), resumes)


def lost_replica(e: BaseException) -> str | None:
    """A key for the replica whose loss ``e`` reports (its actor id where Ray names it), or None when ``e`` is
    not a lost replica (a user error, a bug: those are not retried)."""
    for err in (e, unwrap(e)):
        if isinstance(err, RayActorError):  # ActorDiedError, or ActorUnavailableError
            return err.actor_id or f"unnamed-{uuid.uuid4().hex}"
        if isinstance(err, EngineDeadError):
            return f"engine-{uuid.uuid4().hex}"
    return None


class _Progress:
    """Per choice: the last output and every token the client has received so far."""

    def __init__(self, num_choices: int) -> None:
        self.num_choices = num_choices
        self.last: dict[int, RequestOutput] = {}  # shared with ``abortable`` (it ends unfinished choices)
        self.tokens: dict[int, list[int]] = {}
        self.input_logprobs: dict[int, int] = {}

    def saw(self, index: int, out: RequestOutput) -> None:
        self.tokens.setdefault(index, []).extend(out.token_ids)
        self.input_logprobs[index] = self.input_logprobs.get(index, 0) + len(out.input_logprobs or ())

    @property
    def done(self) -> bool:
        return all(i in self.last and self.last[i].finished for i in range(self.num_choices))

    def points(self) -> list[ResumePoint]:
        points = []
        for i in range(self.num_choices):
            last = self.last.get(i)
            if last is None:
                points.append(ResumePoint(i, None, []))
            elif not last.finished:
                points.append(
                    ResumePoint(
                        i,
                        last.rid,
                        list(self.tokens.get(i, ())),
                        self.input_logprobs.get(i, 0),
                        last.decode_steps,
                        last.jump_forward_tokens,
                    )
                )
        return points


class Resumer:
    """The ingress's side (see the module docstring); counts the requests it resumed and those it could not.

    Example (what ``OpenAIIngress`` does for each generation call)::

        >>> resumer = Resumer(ResumePolicy(timeout_s=30, max_resumes=2))
        >>> outputs = resumer.stream(server_handle, payload, running, prompts, n=1)  # doctest: +SKIP
    """

    def __init__(self, policy: ResumePolicy) -> None:
        self.policy = policy
        self.num_resumed = 0  # replica streams sent again after their replica was lost
        self.num_failed = 0  # requests that ended with an error because they could not be resumed

    async def stream(
        self, server: Any, payload: dict[str, Any], running: Running, prompts: Sequence[Sequence[int]], n: int
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(choice index, output)`` of ``payload`` (an ``LLMServer.generate`` request) from ``server``, resumed
        on another replica as often as the policy allows. Closing it cancels the replica stream."""
        progress = _Progress(len(prompts) * n)
        lost: set[str] = set()
        deadline: float | None = None  # set while a lost request waits for its next output
        attempt, failures = payload, 0
        loop = asyncio.get_running_loop()
        while True:
            items = abortable(
                server.options(stream=True).generate.remote(attempt), running, prompts, n, progress.last
            )
            try:
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            index, out = await anext(items)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        if deadline is None:
                            raise
                        self.num_failed += 1
                        raise self._error(
                            f"no replica took it over within {self.policy.timeout_s:g} s"
                        ) from None
                    deadline, failures = None, 0
                    progress.saw(index, out)
                    yield index, out
            except Exception as e:
                key = lost_replica(e)
                if key is None:
                    raise
                error = e
            finally:
                await items.aclose()
            if progress.done:  # every choice had finished; only the end of the stream was lost
                return
            if key not in lost:
                lost.add(key)
                if len(lost) > self.policy.max_resumes:
                    self.num_failed += 1
                    raise self._error(f"it lost {len(lost)} replicas") from None
                cause = type(unwrap(error)).__name__
                logger.warning("a request lost its replica (%s, actor %s); resuming it", cause, key)
                self.num_resumed += 1
            if deadline is None:
                deadline = loop.time() + self.policy.timeout_s
            else:  # no output since the last loss: Serve may not have dropped the dead replica yet
                await asyncio.sleep(_BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)])
                failures += 1
            attempt = {**payload, "resume": progress.points()}

    @staticmethod
    def _error(why: str) -> HTTPError:
        return HTTPError(
            503,
            f"The model server replica running this request stopped, and the request could not be resumed: {why}.",
            "server_error",
            "replica_lost",
        )


async def astream_resumed(
    engine: Any,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    point: ResumePoint,
    *,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    logprob_start_len: int = -1,
    priority: int = 0,
    lora_name: str | None = None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The replica's side: one choice of an interrupted request continued on ``engine`` (an
    :class:`~sgl_ray.Engine`) from ``point``; yields ``(0, output)`` with the outputs carrying ``point.rid``.
    Leaving early aborts it."""
    sample = point.index % max(params.n, 1)
    images = getattr(prompt_ids, "multimodal", None)  # a prompt with images carries them (see preprocess)
    spec = RequestSpec(
        list(prompt_ids),
        msgspec.structs.replace(params, n=1),
        return_logprob,
        logprob_start_len,
        top_logprobs_num,
        priority,
        lora_name,
        **({"multimodal": images} if images is not None else {}),
    )
    # The engine's own request building (validation, seeds); the request is then filled in before it is queued.
    (req,) = spec.to_reqs(engine.eos_token_ids, engine._rng, engine.model_config.vocab_size)
    req.seed = child_seed(req.seed, sample)  # a user seed gives the sample the seed its first run had
    req.output_ids = list(point.output_ids)
    req.decode_steps, req.jump_forward_tokens = point.decode_steps, point.jump_forward_tokens
    if point.input_logprobs and req.logprob_start_len >= 0:
        req.input_logprob_next = max(1, req.logprob_start_len + point.input_logprobs)
    rid = point.rid or req.rid
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
    engine._core.add([req], lambda out: loop.call_soon_threadsafe(inbox.put_nowait, out))
    finished = False
    try:
        while not finished:
            out = await inbox.get()
            if isinstance(out, BaseException):
                finished = True
                raise out
            finished = out.finished
            yield 0, (out if out.rid == rid else msgspec.structs.replace(out, rid=rid))
    finally:
        if not finished:
            engine.abort(req.rid)
