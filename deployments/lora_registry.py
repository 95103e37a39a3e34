"""One LoRA adapter registry per Serve app, shared by all its ingress replicas.

``LoRARegistry`` is a one-replica deployment of the app holding its :class:`~sgl_ray.deployments.lora.AdapterTable`;
``IngressAdapters`` (``deployments/lora_ingress.py``) is an ingress replica's cached copy of it. Consistency:

- The generation hot path reads only the cache: no round trip to the registry per request.
- Each ingress keeps one long-poll ``watch`` call open; the registry answers it as soon as the table changes, so a
  change reaches every ingress within a round trip.
- A load or unload is acknowledged (to the ingress that asked, and so to the client) only after every live ingress
  has confirmed the new version — it asks for the next one. So once ``POST /v1/load_lora_adapter`` returned, every
  ingress serves the adapter, and once an unload returned, none starts a request on it. An ingress that does not
  confirm within ``ack_timeout_s`` (a dead replica, a stalled loop) does not hold the change up longer; it catches
  up on its next watch.
- An ingress asked for an adapter it does not know refreshes from the registry once before it answers 404.

If the registry's replica restarts, it starts over (new epoch) from the adapters given at start (``lora_paths``).
Each ingress, on seeing the new epoch, redoes the run-time changes it held: it adds back the adapters the new table
lacks and removes those the start brought back (the first ingress to redo one wins; the others' are refused as
duplicates). A change that was not acknowledged before the restart may be undone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sgl_ray.deployments.lora import Adapters, AdapterSnapshot, AdapterTable

logger = logging.getLogger(__name__)

Token = tuple[str, int]  # (epoch, version) an ingress holds


class LoRARegistry:
    """The app's adapters, served to its ingress replicas (deploy with one replica; ``build_openai_app`` does).
    Every method is a coroutine, so all of them run on the replica's event loop, one at a time between awaits.

    Example (what ``build_openai_app`` does when LoRA is enabled)::

        >>> start = {"sql": ("/adapters/sql", False)}  # name -> (path, pinned)
        >>> registry = serve.deployment(LoRARegistry, num_replicas=1).bind(start)  # doctest: +SKIP
    """

    def __init__(self, adapters: Adapters, poll_s: float = 10.0, ack_timeout_s: float = 5.0) -> None:
        self.table = AdapterTable(adapters)
        self.poll_s, self.ack_timeout_s = poll_s, ack_timeout_s
        self._cond = asyncio.Condition()  # table changes and ingress confirmations
        self._held: dict[str, Token | None] = {}  # ingress id -> the version it holds
        self._contact: dict[str, float] = {}  # ingress id -> when it last called
        self._watching: set[str] = set()

    def _token(self) -> Token:
        return self.table.epoch, self.table.version

    async def watch(self, ingress_id: str, have: Token | None) -> AdapterSnapshot:
        """The table, as soon as it differs from ``have`` (or after ``poll_s``). Calling it with ``have``
        confirms that ``ingress_id`` now serves that version."""
        async with self._cond:
            self._confirm(ingress_id, have)
            if have == self._token():
                self._watching.add(ingress_id)
                try:
                    async with asyncio.timeout(self.poll_s):
                        await self._cond.wait_for(lambda: have != self._token())
                except TimeoutError:
                    pass
                finally:
                    self._watching.discard(ingress_id)
                    self._contact[ingress_id] = time.monotonic()
            return self.table.snapshot()

    async def add(self, name: str, path: str, pinned: bool) -> AdapterSnapshot:
        """Add a checked adapter; returns once every live ingress holds it."""
        async with self._cond:
            snapshot = self.table.add(name, path, pinned)
            await self._published(snapshot)
            return snapshot

    async def remove(self, name: str) -> AdapterSnapshot:
        """Remove an adapter; returns once no live ingress starts requests on it."""
        async with self._cond:
            snapshot = self.table.remove(name)
            await self._published(snapshot)
            return snapshot

    async def snapshot(self) -> AdapterSnapshot:
        return self.table.snapshot()

    async def status(self) -> dict[str, Any]:
        """``{"epoch", "version", "adapters", "ingresses": {live ingress id: version it holds}}``."""
        live = {
            i: held[1] if held and held[0] == self.table.epoch else None for i, held in self._held.items()
        }
        return {
            "epoch": self.table.epoch,
            "version": self.table.version,
            "adapters": dict(self.table.adapters),
            "ingresses": {i: v for i, v in live.items() if self._live(i)},
        }

    # --- confirmations -------------------------------------------------------------------------------------------
    def _confirm(self, ingress_id: str, have: Token | None) -> None:
        now = time.monotonic()
        self._held[ingress_id], self._contact[ingress_id] = have, now
        for gone in [
            i for i, t in self._contact.items() if now - t > 10 * self.poll_s and i not in self._watching
        ]:
            del self._held[gone], self._contact[gone]
        self._cond.notify_all()

    def _live(self, ingress_id: str) -> bool:
        """In a watch now, or called within ``ack_timeout_s`` (a live ingress calls again as soon as one returns)."""
        recent = time.monotonic() - self._contact.get(ingress_id, 0.0) < self.ack_timeout_s
        return ingress_id in self._watching or recent

    def _lagging(self, snapshot: AdapterSnapshot) -> list[str]:
        return [
            i
            for i, held in self._held.items()
            if self._live(i) and (held is None or held[0] != snapshot.epoch or held[1] < snapshot.version)
        ]

    async def _published(self, snapshot: AdapterSnapshot) -> None:
        self._cond.notify_all()  # wakes the watches, whose next calls confirm
        try:
            async with asyncio.timeout(self.ack_timeout_s):
                await self._cond.wait_for(lambda: not self._lagging(snapshot))
        except TimeoutError:
            logger.warning(
                "LoRA registry version %d: ingress replicas %s did not confirm within %.1f s",
                snapshot.version,
                self._lagging(snapshot),
                self.ack_timeout_s,
            )
