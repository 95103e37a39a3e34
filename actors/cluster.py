"""Joining a Ray cluster, or starting a local one: :func:`ensure_ray`.

Which cluster, in Ray's order: ``address`` (``--address``), else ``RAY_ADDRESS``, else the cluster that ``ray start``
last recorded on this machine (``<ray temp dir>/ray_current_cluster``), else a new local one. Before joining, the
address is checked to answer, so that a dead one fails (or is skipped) in seconds instead of Ray retrying it for
minutes:

- named by the caller (``address``, ``RAY_ADDRESS``, ``"auto"``) and not answering: :class:`RayClusterUnreachableError`
  naming it, within :data:`NAMED_PATIENCE_S`;
- only recorded by an earlier ``ray start`` (a stale record of a stopped cluster): a warning, and a local cluster.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import ray

from sgl_ray.errors import RayClusterUnreachableError

logger = logging.getLogger(__name__)

NAMED_PATIENCE_S = 5.0
"""How long an address the caller named may take to accept a connection."""
RECORDED_PATIENCE_S = 1.0
"""How long the cluster recorded by ``ray start`` may take (a live one answers at once)."""


def ensure_ray(address: str | None, *, log_to_driver: bool = False, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (None: ``RAY_ADDRESS``, or the one ``ray start`` began on this machine),
    or, where there is none, start a local one whose processes listen on 127.0.0.1 only: anyone who reaches a Ray
    cluster's ports can run code on it, so one that nobody asked to share stays on this machine. A local cluster
    gets at least ``num_cpus`` logical CPUs (one per shard actor or replica it must hold), more where the machine
    has more cores. Returns whether this call connected the process (then the caller may ``ray.shutdown()``).

    Ray turns a loopback node address into the host's routable one unless it treats the platform as local-only
    (as on macOS and Windows); for the local start this function makes it do so, and every server of the node
    binds to the node address, 127.0.0.1.

    Example::

        >>> ensure_ray(None, num_cpus=4)  # doctest: +SKIP
        True
        >>> ray.util.get_node_ip_address()  # doctest: +SKIP
        '127.0.0.1'
    """
    if ray.is_initialized():
        return False
    target = cluster_to_join(address)
    if target is not None:
        ray.init(address=target, include_dashboard=False, log_to_driver=log_to_driver)
        return True
    from ray._private import ray_constants

    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by Ray when it picks the node address
    try:
        ray.init(
            address="local",  # not None: that would read a stale record again
            num_cpus=_local_cpus(num_cpus),
            include_dashboard=False,
            log_to_driver=log_to_driver,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters
    return True


def cluster_to_join(address: str | None) -> str | None:
    """The address of the running cluster ``ray.init(address=address)`` would join, checked to answer; None where a
    local cluster should start instead. Raises :class:`RayClusterUnreachableError` for a named address that does
    not answer."""
    if address == "local":
        return None
    env = os.environ.get("RAY_ADDRESS") or None
    named = address if address not in (None, "auto") else env
    if named is not None and "://" in named:  # Ray Client (ray://): ray.init checks it itself
        return named
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address)
    except ConnectionError:  # "auto" with no cluster on this machine
        raise RayClusterUnreachableError(
            "address='auto' asks for a running Ray cluster, but none is recorded on this machine (`ray start "
            "--head` records one); leave the address out to start a local Ray"
        ) from None
    if resolved is None:
        return None
    if _answers(resolved, NAMED_PATIENCE_S if named or address == "auto" else RECORDED_PATIENCE_S):
        return resolved
    if named is not None or address == "auto":
        source = "RAY_ADDRESS" if address in (None, "auto") and env else "the address given"
        given = named if named is not None else "auto"
        shown = resolved if given == resolved else f"{resolved} ({source}: {given})"
        raise RayClusterUnreachableError(
            f"no Ray cluster answers at {shown} (waited {NAMED_PATIENCE_S:g} s). Check that it runs (`ray status "
            f"--address {resolved}`), or leave the address out to start a local Ray"
        )
    from ray._common.utils import get_ray_address_file

    logger.warning(
        "the Ray cluster recorded in %s (%s) does not answer: a stale record of a stopped cluster. Starting a "
        "local Ray instead (`ray stop` removes the record)",
        get_ray_address_file(None),
        resolved,
    )
    return None


def _answers(address: str, patience_s: float) -> bool:
    """Whether something accepts TCP connections at ``host:port`` within ``patience_s``."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + patience_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.2, min(left, 2.0))):
                return True
        except (OSError, ValueError):
            pass
        if time.monotonic() + 0.25 > deadline:
            return False
        time.sleep(0.25)


def _local_cpus(needed: int | None) -> int | None:
    """Logical CPUs for a local cluster: Ray's count of the machine's cores, raised to ``needed``."""
    if not needed:
        return None
    try:
        from ray._private.utils import get_num_cpus

        detected = int(get_num_cpus())
    except Exception:  # a private helper of this Ray version
        detected = os.cpu_count() or 1
    return max(detected, needed) if needed > detected else None
