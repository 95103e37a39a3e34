"""One LoRA adapter registry per Serve app, shared by all its ingress replicas.

``LoRARegistry`` is a one-replica deployment of the app holding its :class:`~sgl_ray.deployments.lora.AdapterTable`;
``IngressAdapters`` is an ingress replica's cached copy of it. Consistency:

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
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from sgl_ray.deployments.lora import (
    Adapters,
    AdapterSnapshot,
    AdapterTable,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    not_found,
)
from sgl_ray.deployments.responses import HTTPError, unwrap
from sgl_ray.errors import InvalidRequestError, ModelNotFoundError
from sgl_ray.lora.adapter import check_adapter

logger = logging.getLogger(__name__)

Token = tuple[str, int]  # (epoch, version) an ingress holds


class LoRARegistry:
    """The app's adapters, served to its ingress replicas (deploy with one replica; ``build_openai_app`` does).

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

    def snapshot(self) -> AdapterSnapshot:
        return self.table.snapshot()

    def status(self) -> dict[str, Any]:
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


class IngressAdapters:
    """An ingress replica's copy of the app's registry: checks loads, resolves ``model`` names, and supplies the
    snapshot every generation call carries. ``registry``: a handle to the app's :class:`LoRARegistry`, or None for
    a table of this ingress alone (LoRA disabled, or an ingress deployed by hand with one replica)."""

    def __init__(
        self, model_id: str, hf_config: Any, max_rank: int, enabled: bool, registry: Any, adapters: Adapters
    ) -> None:
        self.model_id, self.hf_config, self.max_rank, self.enabled = model_id, hf_config, max_rank, enabled
        self.registry = registry
        self._local = AdapterTable(adapters) if registry is None else None
        self.current: AdapterSnapshot | None = self._local.snapshot() if self._local else None
        self.id = uuid.uuid4().hex
        self._started = asyncio.Lock()
        self._watch_task: asyncio.Task | None = None

    @property
    def adapters(self) -> Adapters:
        return self.current.adapters if self.current else {}

    def snapshot(self) -> AdapterSnapshot | None:
        """What LLM replicas sync to (None: LoRA is off, nothing to sync)."""
        return self.current if self.enabled else None

    async def ready(self, timeout_s: float = 30.0) -> None:
        """Before this ingress's first request: fetch the registry's table and start watching it."""
        if self.current is not None:
            return
        async with self._started:
            if self.current is not None:
                return
            try:
                async with asyncio.timeout(timeout_s):
                    self._apply(await self._call("watch", self.id, None))
            except TimeoutError:
                raise HTTPError(503, "The LoRA adapter registry is not available.", "server_error") from None
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def start(self) -> None:
        """:meth:`ready` in the background (at the ingress's start), so the registry knows this ingress at once."""
        try:
            await self.ready()
        except Exception as e:  # the first request tries again
            logger.warning("could not reach the LoRA adapter registry yet: %s", e)

    async def _watch(self) -> None:
        while True:
            try:
                assert self.current is not None
                have = (self.current.epoch, self.current.version)
                self._apply(await self.registry.watch.remote(self.id, have))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the registry restarting: try again shortly
                logger.warning("LoRA registry watch failed (%s); retrying", e)
                await asyncio.sleep(1.0)

    def _apply(self, snapshot: AdapterSnapshot) -> None:
        if snapshot.newer_than(self.current):
            self.current = snapshot

    async def _call(self, method: str, *args: Any) -> AdapterSnapshot:
        if self._local is not None:
            return (
                self._local.snapshot()
                if method in ("watch", "snapshot")
                else getattr(self._local, method)(*args)
            )
        try:
            return await getattr(self.registry, method).remote(*args)
        except Exception as e:  # a registry-side error comes wrapped in a RayTaskError
            raise unwrap(e) from None

    async def resolve(self, model: str | None) -> str | None:
        """The adapter an OpenAI ``model`` names: ``base``, ``base:adapter`` or ``adapter`` (None: the base)."""
        if model is None or model == self.model_id:
            return None
        base, sep, adapter = model.rpartition(":")
        name = adapter if sep and base == self.model_id else model
        if not await self._known(name):
            raise ModelNotFoundError(
                f"The model '{model}' does not exist.", param="model", code="model_not_found"
            )
        return name

    async def check(self, name: str | None) -> None:
        if name is not None and not await self._known(name):
            raise not_found(name)

    async def _known(self, name: str) -> bool:
        if name in self.adapters:
            return True
        if self._local is None and self.enabled:  # maybe loaded a moment ago: ask once
            self._apply(await self._call("snapshot"))
        return name in self.adapters

    async def load(self, req: LoadLoRAAdapterRequest) -> None:
        if not self.enabled:
            raise InvalidRequestError("LoRA is not enabled on this server (enable_lora)", param="lora_name")
        if not req.lora_name or ":" in req.lora_name or req.lora_name == self.model_id:
            raise InvalidRequestError(f"invalid adapter name {req.lora_name!r}", param="lora_name")
        if req.lora_name in self.adapters:  # the registry checks again, atomically
            raise InvalidRequestError(
                f"a LoRA adapter named {req.lora_name!r} is already loaded", param="lora_name"
            )
        config = check_adapter(req.lora_path, self.hf_config, self.max_rank)
        self._apply(await self._call("add", req.lora_name, config.path, req.pinned))

    async def unload(self, req: UnloadLoRAAdapterRequest) -> None:
        if not self.enabled:
            raise not_found(req.lora_name)
        self._apply(await self._call("remove", req.lora_name))

    def close(self) -> None:
        """Stop watching (thread-safe: Serve may call the ingress's destructor off its event loop)."""
        if self._watch_task is not None:
            try:
                self._watch_task.get_loop().call_soon_threadsafe(self._watch_task.cancel)
            except RuntimeError:  # the loop is already closed
                pass
