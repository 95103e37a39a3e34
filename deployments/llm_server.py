"""``LLMServer``: the Ray Serve deployment that holds one engine per replica (in-process on its device, or a Ray
engine group when ``tp_size``/``pp_size`` > 1) and streams generation results to the ingress."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

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

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``request``: ``input_ids`` (one prompt), ``sampling_params`` (dict), ``return_logprob``,
        ``top_logprobs_num``, ``logprob_start_len``. Yields ``(sample index, RequestOutput delta)``; cancelling the
        stream aborts the requests and frees their KV."""
        async for item in self.engine.astream_outputs(
            request["input_ids"],
            request["sampling_params"],
            return_logprob=request.get("return_logprob", False),
            top_logprobs_num=request.get("top_logprobs_num", 0),
            logprob_start_len=request.get("logprob_start_len", -1),
        ):
            yield item

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self.engine.get_stats()
        return {
            "prefix_blocks": self.engine.prefix_summary(PREFIX_BLOCK),
            "num_running": stats["num_running"],
            "num_waiting": stats["num_waiting"],
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

    def check_health(self) -> None:
        self.engine.get_stats()  # raises if the engine died

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
