"""Token-exact cache-aware request routing across ``LLMServer`` replicas.

Each replica publishes (through Serve's periodic routing stats) the chained block hashes of every prefix in its
radix cache. For a request, the router hashes the (first) prompt's token ids the same way (tokenized once, at the
ingress) and prefers the replica holding the longest prefix of it — unless that replica is much busier than the
least loaded one, in which case load wins. Unlike routers that match approximate character trees, a match here
means those exact tokens are cached there.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from sgl_ray.mem_cache.prefix_hash import block_hashes, longest_shared_prefix

PREFIX_BLOCK = 32


def _load(replica: RunningReplica) -> int:
    stats = replica.routing_stats or {}
    return int(stats.get("num_running", 0)) + int(stats.get("num_waiting", 0))


def _prompt_ids(request: PendingRequest | None) -> list[int] | None:
    if request is None or not request.args:
        return None
    body = request.args[0]
    prompts = body.get("prompts") if isinstance(body, dict) else None
    ids = prompts[0] if isinstance(prompts, list) and prompts else None
    return ids if isinstance(ids, list) and ids and isinstance(ids[0], int) else None


class PrefixCacheRouter(RequestRouter):
    """``imbalanced_threshold``: how many more in-flight requests than the least loaded replica the best cache
    match may have before the router falls back to load balancing."""

    def initialize_state(self, imbalanced_threshold: int = 8, **kwargs: Any) -> None:
        self.imbalanced_threshold = imbalanced_threshold
        self.num_cache_routed = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Back off between retries when every replica is at capacity (else the base class spins).
            pending_request.routing_context.should_backoff = True
        by_load = sorted(candidate_replicas, key=_load)
        ids = _prompt_ids(pending_request)
        if ids is None:
            return [by_load]
        hashes = block_hashes(ids, PREFIX_BLOCK)
        matched = {
            r.replica_id: longest_shared_prefix(
                hashes, (r.routing_stats or {}).get("prefix_blocks", ()), PREFIX_BLOCK
            )
            for r in candidate_replicas
        }
        best = max(candidate_replicas, key=lambda r: (matched[r.replica_id], -_load(r)))
        if matched[best.replica_id] == 0 or _load(best) - _load(by_load[0]) > self.imbalanced_threshold:
            return [by_load]
        self.num_cache_routed += 1
        return [[best], [r for r in by_load if r is not best]]
