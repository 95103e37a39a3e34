"""Orders the waiting queue each step (FCFS, longest prefix match, DFS-weight, priority).

LPM and DFS-weight look the waiting requests up in the prefix cache, so requests that share cached (or soon to be
cached) prefixes run close together; above ``_MAX_MATCH_QUEUE`` waiting requests they fall back to FCFS, because
matching every waiting prompt each step would cost more than it saves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict

from sgl_ray.scheduler.kv_manager import KVCacheManager
from sgl_ray.scheduler.request import Req

_MAX_MATCH_QUEUE = 128


class SchedulePolicy(ABC):
    @abstractmethod
    def order(self, waiting: list[Req], kv: KVCacheManager) -> list[Req]:
        """Return ``waiting`` in the order admission should try them (a new list; may be the same order)."""


class FCFSPolicy(SchedulePolicy):
    def order(self, waiting: list[Req], kv: KVCacheManager) -> list[Req]:
        return list(waiting)


class PriorityPolicy(SchedulePolicy):
    """Higher ``priority`` first, then arrival order."""

    def order(self, waiting: list[Req], kv: KVCacheManager) -> list[Req]:
        return sorted(waiting, key=lambda r: (-r.priority, r.arrival))


def _matches(waiting: list[Req], kv: KVCacheManager) -> dict[int, object]:
    nodes = {}
    for r in waiting:
        m = kv.match(r)
        r.prefix_len_hint = m.length if m is not None else 0
        nodes[id(r)] = m.node if m is not None else None
    return nodes


class LPMPolicy(SchedulePolicy):
    """Longest cached prefix first (stable, so ties keep arrival order)."""

    def order(self, waiting: list[Req], kv: KVCacheManager) -> list[Req]:
        if kv.cache is None or len(waiting) > _MAX_MATCH_QUEUE:
            return list(waiting)
        _matches(waiting, kv)
        return sorted(waiting, key=lambda r: -r.prefix_len_hint)


class DFSWeightPolicy(SchedulePolicy):
    """Depth-first over the radix tree, visiting heavier subtrees (more waiting requests) first, so requests that
    share a prefix are admitted back to back while their prefix is hot."""

    def order(self, waiting: list[Req], kv: KVCacheManager) -> list[Req]:
        if kv.cache is None or len(waiting) > _MAX_MATCH_QUEUE:
            return list(waiting)
        nodes = _matches(waiting, kv)
        reqs_at: dict[object, list[Req]] = defaultdict(list)
        weight: dict[object, int] = defaultdict(int)
        children: dict[object, list[object]] = defaultdict(list)
        roots: list[object] = []
        for r in waiting:
            node = nodes[id(r)]
            reqs_at[node].append(r)
            # Walk up the tree, adding the request's weight to every ancestor and recording the edges we pass.
            while node is not None:
                weight[node] += 1
                parent = getattr(node, "parent", None)
                if weight[node] == 1:
                    (children[parent] if parent is not None else roots).append(node)
                node = parent
        # Post-order DFS (iterative): heavier subtrees first; a node's own requests after its subtree, so
        # requests with nothing cached (at a root) come last.
        out: list[Req] = []
        stack: list[tuple[object, bool]] = [(n, False) for n in sorted(roots, key=lambda n: weight[n])]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                out.extend(reqs_at.get(node, ()))
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in sorted(children.get(node, ()), key=lambda n: weight[n]))
        out.extend(reqs_at.get(None, ()))
        return out


_POLICIES: dict[str, type[SchedulePolicy]] = {
    "fcfs": FCFSPolicy,
    "lpm": LPMPolicy,
    "dfs-weight": DFSWeightPolicy,
    "priority": PriorityPolicy,
}


def create_policy(name: str) -> SchedulePolicy:
    return _POLICIES[name]()
