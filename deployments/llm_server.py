"""``LLMServer``: the Ray Serve deployment that holds one engine per replica (in-process on its device, or a Ray
engine group when ``tp_size``/``pp_size`` > 1) and streams generation results to the ingress."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from ray import serve

from sgl_ray.deployments.lora import ReplicaAdapters
from sgl_ray.deployments.resume import astream_resumed
from sgl_ray.deployments.running import Rejected
from sgl_ray.entrypoints.engine import Engine
from sgl_ray.scheduler.output import RequestOutput

logger = logging.getLogger(__name__)

PREFIX_BLOCK = 32  # token granularity of the radix summaries replicas publish for cache-aware routing


class LLMServer:
    """One replica of the model server.

    ``generate`` takes token ids already validated by the ingress and yields the engine's raw output deltas.
    ``record_routing_stats`` publishes a token-exact summary of the replica's radix cache and its load, which Serve
    pulls periodically for the cache-aware router (no extra round trip per request).

    Example (what ``build_openai_app`` does)::

        >>> server = serve.deployment(LLMServer).bind({"model_path": "/models/smollm2"})  # doctest: +SKIP
    """

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        self.engine = Engine(**engine_kwargs)
        self.model_path = self.engine.model_path
        self.adapters = ReplicaAdapters(self.engine)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``request``: ``prompts`` (token-id lists), ``sampling_params``, ``return_logprob``, ``top_logprobs_num``,
        ``logprob_start_len``, ``lora_name`` (an adapter or None), ``priority`` and ``lora_sync`` (the ingress's
        copy of the app's adapter registry, an ``AdapterSnapshot``, applied first when newer than this replica's).
        Yields ``(choice index, RequestOutput delta)`` with choice index ``prompt_index * n + sample``, as the
        engine produces them; a request the engine refuses (a 4xx error) ends the stream with a
        :class:`~sgl_ray.deployments.running.Rejected`.
        Cancelling the stream aborts every request and frees its KV.

        All prompts of one HTTP request come in one call (Serve propagates the caller's request id to nested
        calls, so concurrent calls from one request must not race in the router).

        ``resume`` (set when the ingress resumes a request whose replica was lost; see
        :mod:`sgl_ray.deployments.resume`): the choices to continue, one
        :class:`~sgl_ray.deployments.resume.ResumePoint` each, instead of every prompt × ``n``."""
        self.adapters.sync(request.get("lora_sync"))
        prompts = request["prompts"]
        params = request["sampling_params"]
        n = getattr(params, "n", None) or 1
        options = {
            "return_logprob": request.get("return_logprob", False),
            "top_logprobs_num": request.get("top_logprobs_num", 0),
            "logprob_start_len": request.get("logprob_start_len", -1),
            "priority": request.get("priority") or 0,
        }
        lora = request.get("lora_name")
        resume = request.get("resume")
        if resume is None:  # (first choice index, its stream of (sample, output)) per prompt
            units = [
                (
                    p * n,
                    self.engine.astream_outputs(
                        ids,
                        params,
                        lora_path=lora,
                        multimodal=getattr(ids, "multimodal", None),
                        **options,
                    ),
                )
                for p, ids in enumerate(prompts)
            ]
        else:
            units = [
                (point.index, astream_resumed(self.engine, prompts[point.index // n], params, point,
                                              lora_name=lora, **options))
                for point in resume
            ]  # fmt: skip
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(base: int, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> None:
            try:
                async for index, out in outputs:
                    await queue.put((base + index, out))
            except BaseException as e:  # handed to the caller below
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(base, outputs)) for base, outputs in units]
        live = len(tasks)
        try:
            while live:
                item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    rejected = Rejected.of(item)
                    if rejected is None:
                        raise item
                    yield rejected
                    return
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self.engine.get_stats()
        return {
            "prefix_blocks": self.engine.prefix_summary(PREFIX_BLOCK),
            "num_running": stats["num_running"],
            "num_waiting": stats["num_waiting"],
            "lora_adapters": [n for n, a in self.engine.list_lora_adapters().items() if a["loaded"]],
        }

    def stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def model_info(self) -> dict[str, Any]:
        cfg = self.engine.model_config
        return {
            "model_path": self.model_path,
            "context_length": cfg.context_length,
            "vocab_size": cfg.vocab_size,
        }

    def server_info(self) -> dict[str, Any]:
        """For ``/get_server_info``: the engine's arguments (JSON-safe), its scheduler counters, and which replica
        answered (Serve's replica id: it stays the same across a lightweight config update)."""
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not in a Serve replica
            replica = None
        args = msgspec.to_builtins(dataclasses.asdict(self.engine.args), enc_hook=str)
        return {"engine_args": args, "stats": self.engine.get_stats(), "replica_id": replica}

    def check_health(self) -> None:
        self.engine.get_stats()  # raises if the engine died

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
