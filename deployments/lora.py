"""LoRA adapters in the Serve app: the ingress keeps the app's adapter registry; replicas follow it.

The ingress is the one place adapters are loaded and unloaded (``POST /v1/load_lora_adapter``,
``/v1/unload_lora_adapter``; checked there, so a bad adapter is a 400 before any replica sees it). Every
generation call carries the registry's version and contents; a replica whose copy is older applies the difference
to its engine before it serves the call. So every replica — including ones autoscaling adds later — runs with
the same adapters, without a broadcast to replicas Serve does not let us address. Adapter weights go to a
replica's runner slots when a request there first uses them (pinned ones: when the replica syncs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec

from sgl_ray.errors import InvalidRequestError, ModelNotFoundError, SglRayError
from sgl_ray.lora.adapter import check_adapter

logger = logging.getLogger(__name__)


class LoadLoRAAdapterRequest(msgspec.Struct, kw_only=True):
    lora_name: str
    lora_path: str
    pinned: bool = False


class UnloadLoRAAdapterRequest(msgspec.Struct, kw_only=True):
    lora_name: str


def decode(cls: type, body: bytes):
    try:
        return msgspec.json.decode(body, type=cls)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise InvalidRequestError(f"Invalid request body: {e}") from None


@dataclass
class AdapterRegistry:
    """The ingress's adapters: ``{name: (path, pinned)}`` and a version bumped on every change."""

    model_id: str
    hf_config: Any
    max_rank: int
    enabled: bool
    adapters: dict[str, tuple[str, bool]] = field(default_factory=dict)
    version: int = 0

    def load(self, req: LoadLoRAAdapterRequest) -> None:
        if not self.enabled:
            raise InvalidRequestError("LoRA is not enabled on this server (enable_lora)", param="lora_name")
        if not req.lora_name or ":" in req.lora_name or req.lora_name == self.model_id:
            raise InvalidRequestError(f"invalid adapter name {req.lora_name!r}", param="lora_name")
        if req.lora_name in self.adapters:
            raise InvalidRequestError(
                f"a LoRA adapter named {req.lora_name!r} is already loaded", param="lora_name"
            )
        config = check_adapter(req.lora_path, self.hf_config, self.max_rank)
        self.adapters[req.lora_name] = (config.path, req.pinned)
        self.version += 1

    def unload(self, req: UnloadLoRAAdapterRequest) -> None:
        if self.adapters.pop(req.lora_name, None) is None:
            raise _not_found(req.lora_name)
        self.version += 1

    def resolve(self, model: str | None) -> str | None:
        """The adapter an OpenAI ``model`` names: ``base``, ``base:adapter`` or ``adapter`` (None: the base)."""
        if model is None or model == self.model_id:
            return None
        base, sep, adapter = model.rpartition(":")
        name = adapter if sep and base == self.model_id else model
        if name not in self.adapters:
            raise ModelNotFoundError(
                f"The model '{model}' does not exist.", param="model", code="model_not_found"
            )
        return name

    def check(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise _not_found(name)

    def snapshot(self) -> tuple[int, dict[str, tuple[str, bool]]]:
        return self.version, dict(self.adapters)


def _not_found(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"LoRA adapter '{name}' is not loaded.", param="lora_name", code="model_not_found"
    )


class ReplicaAdapters:
    """A replica's view of the registry; :meth:`sync` brings its engine up to a newer snapshot."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.version = 0  # snapshot 0: the adapters the engine was started with

    def sync(self, snapshot: tuple[int, dict[str, tuple[str, bool]]] | None) -> None:
        if snapshot is None or snapshot[0] == self.version:
            return
        version, wanted = snapshot
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
        self.version = version
