"""The Serve tests use the session's Serve app (``serve_url``, ``client``, ``aclient`` in ``tests/conftest.py``)."""

from __future__ import annotations

from ..conftest import API_KEY, free_port

__all__ = ["API_KEY", "free_port"]
