"""The placement group of an engine's shards: refused at once when the cluster can never hold it, waited for (up to
``placement_timeout``) when the cluster is only busy.

"Can never hold" compares the shards' bundles with the *total* resources of the cluster's live nodes: one bundle
per shard (``{"CPU": 1}``, or ``{"CPU": 1, "GPU": 1}`` on GPUs), all on one node (STRICT_PACK) when the cluster has
one node, else packed where they fit (PACK). A cluster whose nodes a node provider started (KubeRay, ``ray up``)
may still grow, so there it only waits.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from sgl_ray.errors import InsufficientResourcesError, ResourcesBusyError

logger = logging.getLogger(__name__)

_SHOWN = ("CPU", "GPU")  # the resources a bundle asks for, in messages


@dataclass(frozen=True)
class ShardBundles:
    """What an engine's shards ask of the cluster: ``count`` bundles of ``bundle`` each.

    Example::

        >>> ShardBundles.for_shards(3, gpu=False).bundle
        {'CPU': 1.0}
    """

    count: int
    bundle: dict[str, float]
    layout: str = ""  # how the count came about, for messages ("tp_size 3 × pp_size 1 × dp_size 1")

    @classmethod
    def for_shards(cls, count: int, gpu: bool, layout: str = "") -> ShardBundles:
        return cls(count, {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": 1.0}, layout)

    @property
    def asks(self) -> list[str]:
        """The resources a bundle asks for, as messages name them."""
        return [r for r in _SHOWN if self.bundle.get(r)]

    def fits_in(self, node: dict[str, float]) -> int:
        """How many bundles one node's resources hold."""
        return min(math.floor(node.get(r, 0.0) / need + 1e-9) for r, need in self.bundle.items() if need > 0)

    def describe(self) -> str:
        shape = ", ".join(f"{r}: {_num(v)}" for r, v in self.bundle.items())
        of = f" ({self.layout})" if self.layout else ""
        return f"{self.count} placement-group bundle{'s' if self.count != 1 else ''} of {{{shape}}}, one per shard{of}"


def live_nodes() -> list[dict[str, float]]:
    """Total resources of each live node of the cluster this process is connected to."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def strategy(nodes: list[dict[str, float]]) -> str:
    return "STRICT_PACK" if len(nodes) == 1 else "PACK"


def check_fits(shards: ShardBundles) -> None:
    """Raise :class:`InsufficientResourcesError` if the cluster's live nodes, empty, could not hold ``shards``
    (unless an autoscaler may add nodes). Costs a few GCS calls: no placement group is made."""
    nodes = live_nodes()
    room = shards.fits_in(nodes[0]) if len(nodes) == 1 else sum(shards.fits_in(n) for n in nodes)
    if room >= shards.count:
        return
    if autoscaler_running():
        logger.warning(
            "the cluster holds %d of %s now; waiting for the autoscaler to add nodes", room, shards.describe()
        )
        return
    total, free = _sum(nodes), ray.available_resources()
    short = [r for r, need in shards.bundle.items() if total.get(r, 0.0) < need * shards.count]
    where = "1 node has" if len(nodes) == 1 else f"{len(nodes)} nodes have"
    have = ", ".join(
        f"{_num(total.get(r, 0.0))} {r}s in total ({_num(free.get(r, 0.0))} free)" for r in shards.asks
    )
    msg = (
        f"this Ray cluster can never hold the engine: it needs {shards.describe()}, but its {where} "
        f"{have}, room for {room} such bundle{'s' if room != 1 else ''}"
    )
    if not short and len(nodes) > 1:
        msg += " (the shards' bundles do not fit on the nodes one by one)"
    cpus = math.ceil(shards.bundle.get("CPU", 0.0) * shards.count)
    if "GPU" in shards.bundle:
        msg += (
            f". Add nodes with GPUs (each shard takes one GPU: {shards.count} needed), or use a smaller tp_size, "
            "pp_size or dp_size"
        )
    else:
        msg += (
            f". Logical CPUs are only a count: start Ray with more (`ray start --head --num-cpus {cpus}`, or "
            f"`ray.init(num_cpus={cpus})`), or use a smaller tp_size, pp_size or dp_size"
        )
    raise InsufficientResourcesError(msg)


def reserve(shards: ShardBundles, timeout_s: float) -> PlacementGroup:
    """A ready placement group for ``shards``. Raises :class:`InsufficientResourcesError` at once when the cluster
    can never hold it, and :class:`ResourcesBusyError` (naming what holds the resources) when it was not placed
    within ``timeout_s``; nothing stays reserved then.

    Example::

        >>> pg = reserve(ShardBundles.for_shards(2, gpu=False), timeout_s=60)  # doctest: +SKIP
    """
    check_fits(shards)
    nodes = live_nodes()
    pg = placement_group([dict(shards.bundle) for _ in range(shards.count)], strategy=strategy(nodes))
    if pg.wait(timeout_s):
        return pg
    remove_placement_group(pg)
    total, free = _sum(live_nodes()), ray.available_resources()
    have = ", ".join(f"{_num(free.get(r, 0.0))} of {_num(total.get(r, 0.0))} {r}s free" for r in shards.asks)
    raise ResourcesBusyError(
        f"the cluster could hold {shards.describe()}, but they were not placed within {_num(timeout_s)} s: "
        f"{have}; held by {_holders(pg.id.hex(), total, free)}. Free resources (stop other engines or Serve "
        "apps), or wait longer (placement_timeout / --placement-timeout)"
    )


def autoscaler_running() -> bool:
    """Whether an autoscaler may add nodes: some node was started by a node provider (KubeRay, ``ray up``), which
    names its type (nodes of ``ray start`` have none), or nodes are being launched."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
        nodes = [*status.active_nodes, *status.idle_nodes]
        typed = [n for n in nodes if n.ray_node_type_name and n.ray_node_type_name != f"node_{n.node_id}"]
        return bool(typed or status.pending_launches or status.pending_nodes)
    except Exception:  # an API of this Ray version: assume a fixed cluster
        logger.debug("could not tell whether an autoscaler runs", exc_info=True)
        return False


def _holders(own_pg: str, total: dict[str, float], free: dict[str, float]) -> str:
    """Who holds the resources that are not free: placement groups by name, the rest as one figure."""
    groups: list[str] = []
    held: dict[str, float] = {}
    for pg_id, info in placement_group_table().items():
        if pg_id == own_pg or info.get("state") != "CREATED":
            continue
        sums: dict[str, float] = {}
        for bundle in info.get("bundles", {}).values():
            for r in _SHOWN:
                sums[r] = sums.get(r, 0.0) + bundle.get(r, 0.0)
        if not any(sums.values()):
            continue
        for r, v in sums.items():
            held[r] = held.get(r, 0.0) + v
        name = repr(info["name"]) if info.get("name") else f"id {pg_id[:8]}"
        groups.append(f"{name} ({', '.join(f'{_num(v)} {r}' for r, v in sums.items() if v)})")
    rest = {r: total.get(r, 0.0) - free.get(r, 0.0) - held.get(r, 0.0) for r in _SHOWN}
    parts = [f"placement groups {', '.join(groups)}"] if groups else []
    if any(v > 0 for v in rest.values()):
        figures = ", ".join(f"{_num(v)} {r}" for r, v in rest.items() if v > 0)
        parts.append(
            f"actors and tasks outside placement groups ({figures}: Serve replicas, other drivers' work)"
        )
    return "; ".join(parts) or "nothing now (retry)"


def _sum(nodes: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for node in nodes:
        for r, v in node.items():
            total[r] = total.get(r, 0.0) + v
    return total


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
