"""Token-exact cache-aware request routing across ``LLMServer`` replicas.

Each replica publishes (through Serve's periodic routing stats) the chained block hashes of every prefix in its
radix cache. For a request, the router hashes the (first) prompt's token ids the same way (tokenized once, at the
ingress; each image's tokens replaced by one key id derived from its pixels' hash, as the radix caches hold them)
and prefers the replica holding the longest prefix of it — unless that replica is much busier than the
least loaded one, in which case load wins. A request for a LoRA adapter hashes its prompt in the adapter's
namespace (KV is never shared across adapters), and without a cache match it prefers the least loaded replica that
already holds the adapter in its runner slots (replicas publish those names too). Unlike routers that match
approximate character trees, a match here means those exact tokens are cached there.

``RoundRobinRouter`` is the cache-blind baseline it is measured against (with Serve's default power-of-two).
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from sgl_ray.mem_cache.prefix_hash import block_hashes, longest_shared_prefix
from sgl_ray.multimodal.chat import ImagePrompt

PREFIX_BLOCK = 32


def _load(stats: dict) -> int:
    return int(stats.get("num_running", 0)) + int(stats.get("num_waiting", 0))


def _body(request: PendingRequest | None) -> dict:
    if request is None or not request.args or not isinstance(request.args[0], dict):
        return {}
    return request.args[0]


def _prompt_ids(body: dict) -> list[int] | None:
    """The first prompt's ids as a replica's radix cache keys them: an :class:`ImagePrompt`'s images by their
    key ids, so the same image and text match and another image is no shared prefix."""
    prompts = body.get("prompts")
    ids = prompts[0] if isinstance(prompts, list) and prompts else None
    if isinstance(ids, ImagePrompt):
        ids = ids.cache_ids()
    return ids if isinstance(ids, list) and ids and isinstance(ids[0], int) else None


def rank_replicas(
    stats: dict[str, dict], body: dict, imbalanced_threshold: int
) -> tuple[list[list[str]], str]:
    """The routing decision on plain data: ``stats`` maps replica id → its published routing stats
    (``prefix_blocks``, ``lora_adapters``, ``num_running``, ``num_waiting``); ``body`` is the ``generate``
    payload. Returns replica-id tiers to try in order and why (``load``, ``cache`` or ``adapter``).

    >>> stats = {"r1": {"num_running": 1}, "r2": {"num_running": 0}, "r3": {"lora_adapters": ["sql"]}}
    >>> rank_replicas(stats, {"prompts": [[1, 2, 3]], "lora_name": "sql"}, 8)
    ([['r3'], ['r2', 'r1']], 'adapter')
    """
    by_load = sorted(stats, key=lambda r: _load(stats[r]))
    ids, lora = _prompt_ids(body), body.get("lora_name")
    if ids is None:
        return [by_load], "load"
    hashes = block_hashes(ids, PREFIX_BLOCK, lora)  # an adapter's prefixes live in its own namespace
    matched = {
        r: longest_shared_prefix(hashes, s.get("prefix_blocks", ()), PREFIX_BLOCK) for r, s in stats.items()
    }
    best = max(by_load, key=lambda r: (matched[r], -_load(stats[r])))
    least = _load(stats[by_load[0]])
    if matched[best] > 0 and _load(stats[best]) - least <= imbalanced_threshold:
        return [[best], [r for r in by_load if r != best]], "cache"
    if matched[best] == 0 and lora is not None:
        holders = [r for r in by_load if lora in stats[r].get("lora_adapters", ())]
        if holders and _load(stats[holders[0]]) - least <= imbalanced_threshold:
            return [holders, [r for r in by_load if r not in holders]], "adapter"
    return [by_load], "load"


class _TieredRouter(RequestRouter):
    """A router whose decision is a plain function of the replicas' ids, routing stats and the request body."""

    def tiers(self, stats: dict[str, dict], body: dict) -> list[list[str]]:
        raise NotImplementedError

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Back off between retries when every replica is at capacity (else the base class spins).
            pending_request.routing_context.should_backoff = True
        replicas = {r.replica_id.unique_id: r for r in candidate_replicas}
        stats = {rid: r.routing_stats or {} for rid, r in replicas.items()}
        return [[replicas[rid] for rid in tier] for tier in self.tiers(stats, _body(pending_request)) if tier]


class PrefixCacheRouter(_TieredRouter):
    """``imbalanced_threshold``: how many more in-flight requests than the least loaded replica the best cache
    match (or adapter holder) may have before the router falls back to load balancing."""

    def initialize_state(self, imbalanced_threshold: int = 8, **kwargs: Any) -> None:
        self.imbalanced_threshold = imbalanced_threshold
        self.num_routed = {"load": 0, "cache": 0, "adapter": 0}

    def tiers(self, stats: dict[str, dict], body: dict) -> list[list[str]]:
        tiers, why = rank_replicas(stats, body, self.imbalanced_threshold)
        self.num_routed[why] += 1
        return tiers


def round_robin_tiers(replica_ids: list[str], turn: int) -> list[list[str]]:
    """The ``turn``-th request goes to the next replica in id order; the others are fallbacks if it is full.

    >>> round_robin_tiers(["b", "a", "c"], 4)
    [['b'], ['c', 'a']]
    """
    ordered = sorted(replica_ids)
    i = turn % len(ordered)
    return [[ordered[i]], ordered[i + 1 :] + ordered[:i]]


class RoundRobinRouter(_TieredRouter):
    """Requests to the replicas in turn, whatever their load or cache contents."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.turn = 0

    def tiers(self, stats: dict[str, dict], body: dict) -> list[list[str]]:
        self.turn += 1
        return round_robin_tiers(list(stats), self.turn - 1)
