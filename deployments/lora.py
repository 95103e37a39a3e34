"""LoRA adapters in the Serve app: one registry per app; ingress replicas cache it; LLM replicas follow it.

The app's adapters (``{name: (path, pinned)}``) live in one :class:`AdapterTable`, held by the app's
``LoRARegistry`` deployment (``deployments/lora_registry.py``), so every ingress replica serves the same set.
Adapters are loaded and unloaded through any ingress (``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``;
checked there, so a bad adapter is a 400 before any replica sees it). Each ingress keeps a cached copy that the
registry pushes changes to, and a change is acknowledged to the client only once every live ingress holds it.

Every generation call carries the ingress's :class:`AdapterSnapshot`; an LLM replica whose copy is older applies
the difference to its engine before it serves the call. So every replica — including ones autoscaling adds later
— runs with the same adapters, without a broadcast to replicas Serve does not let us address. Adapter weights go
to a replica's runner slots when a request there first uses them (pinned ones: when the replica syncs).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, NamedTuple, TypeVar

import msgspec

from sgl_ray.errors import InvalidRequestError, ModelNotFoundError, SglRayError
from sgl_ray.protocol.decoding import decode_struct

logger = logging.getLogger(__name__)

Adapters = dict[str, tuple[str, bool]]  # name -> (adapter directory, pinned)
R = TypeVar("R", bound=msgspec.Struct)


class LoadLoRAAdapterRequest(msgspec.Struct, kw_only=True):
    """``model``: the base model the adapter is for, in an app of several models (default: its LoRA model)."""

    lora_name: str
    lora_path: str
    pinned: bool = False
    model: str | None = None


class UnloadLoRAAdapterRequest(msgspec.Struct, kw_only=True):
    lora_name: str
    model: str | None = None


def decode(cls: type[R], body: bytes) -> R:
    """A LoRA route's body; a 400 naming the field for a bad one (as every route's decoding gives)."""
    return decode_struct(cls, body)


class AdapterSnapshot(NamedTuple):
    """The registry's adapters at one version. ``epoch`` names one registry lifetime (a restarted registry starts
    a new one); within an epoch ``version`` grows by one per change."""

    epoch: str
    version: int
    adapters: Adapters

    def newer_than(self, other: AdapterSnapshot | None) -> bool:
        return other is None or self.epoch != other.epoch or self.version > other.version


class AdapterTable:
    """The authoritative ``{name: (path, pinned)}`` of one app and its version (names and paths already checked)."""

    def __init__(self, adapters: Adapters | None = None) -> None:
        self.epoch = uuid.uuid4().hex
        self.version = 0
        self.adapters: Adapters = dict(adapters or {})

    def add(self, name: str, path: str, pinned: bool) -> AdapterSnapshot:
        if name in self.adapters:
            raise InvalidRequestError(f"a LoRA adapter named {name!r} is already loaded", param="lora_name")
        self.adapters[name] = (path, pinned)
        self.version += 1
        return self.snapshot()

    def remove(self, name: str) -> AdapterSnapshot:
        if self.adapters.pop(name, None) is None:
            raise not_found(name)
        self.version += 1
        return self.snapshot()

    def snapshot(self) -> AdapterSnapshot:
        return AdapterSnapshot(self.epoch, self.version, dict(self.adapters))


def not_found(name: str, param: str = "lora_name") -> ModelNotFoundError:
    """The 404 of an adapter that is not loaded; ``param``: the request field that named it."""
    return ModelNotFoundError(f"LoRA adapter '{name}' is not loaded.", param=param, code="model_not_found")


class ReplicaAdapters:
    """A replica's view of the registry; :meth:`sync` brings its engine up to a newer snapshot (an older one,
    carried by a call that was under way before the change, is ignored)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.applied: AdapterSnapshot | None = None  # None: the adapters the engine was started with

    def sync(self, snapshot: AdapterSnapshot | None) -> None:
        if snapshot is None or not snapshot.newer_than(self.applied):
            return
        wanted = snapshot.adapters
        have = self.engine.list_lora_adapters()
        for name, info in have.items():
            if wanted.get(name, (None,))[0] != info["path"]:
                self.engine.unload_lora_adapter(name)  # deferred while requests use it
        for name, (path, pinned) in wanted.items():
            if name not in have or have[name]["path"] != path:
                try:
                    self.engine.load_lora_adapter(name, path, pinned)
                except SglRayError as e:  # e.g. an old version still draining: retried on the next call
                    logger.warning("could not load LoRA adapter %s here yet: %s", name, e)
                    return
        self.applied = snapshot
