"""Rendezvous helpers: the address a group's rank 0 listens on, found where rank 0 runs (nothing hard-coded)."""

from __future__ import annotations

import socket

import ray


def node_ip() -> str:
    """This process's node IP as Ray sees it."""
    return ray.util.get_node_ip_address()


def free_port() -> int:
    """A TCP port that is free on this node right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
