"""``IngressAdapters``: an ingress replica's copy of the app's LoRA registry (see ``deployments/lora_registry.py``
for how it stays current and what an acknowledged change guarantees)."""

from __future__ import annotations

import asyncio
import logging
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


class IngressAdapters:
    """An ingress replica's copy of the app's registry: checks loads, resolves ``model`` names, and supplies the
    snapshot every generation call carries. ``registry``: a handle to the app's :class:`LoRARegistry`, or None for
    a table of this ingress alone (LoRA disabled, or an ingress deployed by hand with one replica).
    ``allow_pickle``: accept adapters whose weights are a pickle (``adapter_model.bin``; engine option
    ``lora_allow_pickle``), not only safetensors."""

    def __init__(
        self,
        model_id: str,
        hf_config: Any,
        max_rank: int,
        enabled: bool,
        registry: Any,
        adapters: Adapters,
        *,
        allow_pickle: bool = False,
    ) -> None:
        self.model_id, self.hf_config, self.max_rank, self.enabled = model_id, hf_config, max_rank, enabled
        self.allow_pickle = allow_pickle
        self.registry = registry
        self._local = AdapterTable(adapters) if registry is None else None
        self.current: AdapterSnapshot | None = self._local.snapshot() if self._local else None
        self.id = uuid.uuid4().hex
        self._started = asyncio.Lock()
        self._watch_task: asyncio.Task | None = None
        self._restoring: asyncio.Task | None = None  # re-registering adapters a restarted registry lost

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
        if not snapshot.newer_than(self.current):
            return
        old, self.current = self.current, snapshot
        if old is not None and old.epoch != snapshot.epoch and self._local is None:
            # The registry restarted from the adapters given at start: it lost the loads and unloads made at
            # run time, which this ingress still knows. Redo them (every ingress may; the registry keeps the first).
            lost = {n: a for n, a in old.adapters.items() if n not in snapshot.adapters}
            back = [n for n in snapshot.adapters if n not in old.adapters]
            if lost or back:
                self._restoring = asyncio.get_running_loop().create_task(self._restore(lost, back))

    async def _restore(self, lost: Adapters, back: list[str]) -> None:
        changes = [("add", n, *a) for n, a in lost.items()] + [("remove", n) for n in back]
        for method, name, *rest in changes:
            try:
                self._apply(await self._call(method, name, *rest))
                logger.info("LoRA adapter %r: %s again after the registry restarted", name, method)
            except (InvalidRequestError, ModelNotFoundError):  # another ingress redid it first
                pass
            except Exception as e:  # the registry went away again: the next restart tries again
                logger.warning("could not redo %s of LoRA adapter %r: %s", method, name, e)
                return

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
        if not await self.known(name):
            raise ModelNotFoundError(
                f"The model '{model}' does not exist.", param="model", code="model_not_found"
            )
        return name

    async def check(self, name: str | None) -> None:
        """A 404 unless ``name`` (``/generate``'s ``lora_path``) is None or a loaded adapter."""
        if name is not None and not await self.known(name):
            raise not_found(name, param="lora_path")

    async def known(self, name: str) -> bool:
        """Whether ``name`` is a loaded adapter (asking the registry once when this replica does not know it)."""
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
        # reads the adapter's weights: off the event loop
        config = await asyncio.to_thread(
            check_adapter, req.lora_path, self.hf_config, self.max_rank, allow_pickle=self.allow_pickle
        )
        self._apply(await self._call("add", req.lora_name, config.path, req.pinned))

    async def unload(self, req: UnloadLoRAAdapterRequest) -> None:
        if not self.enabled or not await self.known(req.lora_name):  # the registry checks again, atomically
            raise not_found(req.lora_name)
        self._apply(await self._call("remove", req.lora_name))

    def close(self) -> None:
        """Stop watching (thread-safe: Serve may call the ingress's destructor off its event loop)."""
        if self._watch_task is not None:
            try:
                self._watch_task.get_loop().call_soon_threadsafe(self._watch_task.cancel)
            except RuntimeError:  # the loop is already closed
                pass
