"""The scheduler side of multi-LoRA: which adapters exist, which one sits in which of the runner's slots.

Metadata only (no tensors). Invariants:

* ``max_slots`` slots; a running request holds its adapter's slot (``active`` count), so a batch never uses more
  than ``max_slots`` distinct adapters, and a slot is only reassigned when no running request uses it.
* Eviction picks the least recently used unpinned adapter with no running request. Pinned adapters are loaded
  at registration and never evicted.
* Unregistering an adapter that accepted requests still use is deferred: new requests are refused at once, the
  slot and the name are freed when the last one finishes.
* Every slot (re)assignment is queued as a :class:`LoRALoad` for the next step plan.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from sgl_ray.errors import InvalidRequestError, ModelNotFoundError
from sgl_ray.scheduler.plan import LoRALoad


@dataclass
class _Adapter:
    name: str
    path: str
    pinned: bool
    users: int = 0  # accepted requests not finished yet
    active: int = 0  # running requests (holding the slot)
    slot: int = -1
    removing: bool = False


class AdapterPool:
    """Example::

    >>> pool = AdapterPool(max_slots=2)
    >>> pool.register("sql", "/adapters/sql")
    >>> pool.acquire("sql"), [(l.slot, l.path) for l in pool.take_loads()]
    (0, [(0, '/adapters/sql')])
    """

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self._adapters: dict[str, _Adapter] = {}
        self._owner: list[str | None] = [None] * max_slots
        self._lru: OrderedDict[str, None] = OrderedDict()  # adapters in slots, least recently used first
        self._loads: list[LoRALoad] = []

    # --- registry ----------------------------------------------------------------------------------------------
    def register(self, name: str, path: str, pinned: bool = False) -> None:
        if not name or ":" in name:
            raise InvalidRequestError(
                f"invalid LoRA adapter name {name!r} (non-empty, no ':')", param="lora_name"
            )
        if name in self._adapters and not self._adapters[name].removing:
            raise InvalidRequestError(f"a LoRA adapter named {name!r} is already loaded", param="lora_name")
        if name in self._adapters:  # re-registered while its old version drains: not supported mid-drain
            raise InvalidRequestError(
                f"LoRA adapter {name!r} is still being unloaded (requests use it); retry later",
                param="lora_name",
            )
        if pinned and sum(a.pinned for a in self._adapters.values()) >= self.max_slots:
            raise InvalidRequestError(
                f"all {self.max_slots} LoRA slots are pinned (max_loras_per_batch)", param="pinned"
            )
        self._adapters[name] = adapter = _Adapter(name, path, pinned)
        if pinned and self._take_slot(adapter) < 0:
            del self._adapters[name]
            raise InvalidRequestError(
                "no LoRA slot is free for a pinned adapter now; retry later", param="pinned"
            )

    def unregister(self, name: str) -> bool:
        """Remove an adapter; returns False when it is deferred until its requests finish."""
        adapter = self._get(name)
        adapter.removing = True
        if adapter.users:
            return False
        self._drop(adapter)
        return True

    def adapters(self) -> dict[str, dict]:
        return {
            a.name: {"path": a.path, "pinned": a.pinned, "loaded": a.slot >= 0}
            for a in self._adapters.values()
            if not a.removing
        }

    def loaded_names(self) -> list[str]:
        return [n for n in self._owner if n is not None]

    def _get(self, name: str) -> _Adapter:
        adapter = self._adapters.get(name)
        if adapter is None or adapter.removing:
            raise ModelNotFoundError(
                f"LoRA adapter {name!r} is not loaded", param="lora_path", code="model_not_found"
            )
        return adapter

    # --- requests ------------------------------------------------------------------------------------------------
    def add_user(self, name: str) -> None:
        """A request using ``name`` was accepted (raises if the adapter is unknown or being removed)."""
        self._get(name).users += 1

    def remove_user(self, name: str) -> None:
        adapter = self._adapters[name]
        adapter.users -= 1
        if adapter.removing and adapter.users == 0:
            self._drop(adapter)

    def acquire(self, name: str) -> int:
        """The slot of ``name`` for a request about to run (loading it, evicting if needed); -1 if every slot is
        held by running requests or pinned."""
        adapter = self._adapters[name]
        slot = adapter.slot if adapter.slot >= 0 else self._take_slot(adapter)
        if slot >= 0:
            adapter.active += 1
            self._lru.move_to_end(name)
        return slot

    def release(self, name: str) -> None:
        self._adapters[name].active -= 1

    def can_free_slot(self) -> bool:
        """Whether a slot can become free once running requests finish (not every slot is pinned)."""
        return any(n is None or not self._adapters[n].pinned for n in self._owner)

    def take_loads(self) -> list[LoRALoad]:
        loads, self._loads = self._loads, []
        return loads

    def reset_slots(self) -> None:
        """The runner lost its weights (shard group rebuilt): forget every slot; pinned adapters load again."""
        self._owner = [None] * self.max_slots
        self._lru.clear()
        self._loads.clear()
        for a in self._adapters.values():
            a.slot, a.active = -1, 0
        for a in self._adapters.values():
            if a.pinned and not a.removing:
                self._take_slot(a)

    # --- slots ---------------------------------------------------------------------------------------------------
    def _take_slot(self, adapter: _Adapter) -> int:
        if None in self._owner:
            slot = self._owner.index(None)
        else:
            victim = next(
                (
                    self._adapters[n]
                    for n in self._lru
                    if not self._adapters[n].pinned and not self._adapters[n].active
                ),
                None,
            )
            if victim is None:
                return -1
            slot = victim.slot
            self._evict(victim)
        self._owner[slot] = adapter.name
        adapter.slot = slot
        self._lru[adapter.name] = None
        self._loads.append(LoRALoad(slot=slot, name=adapter.name, path=adapter.path))
        return slot

    def _evict(self, adapter: _Adapter) -> None:
        if adapter.slot >= 0:
            self._owner[adapter.slot] = None
            self._lru.pop(adapter.name, None)
            adapter.slot = -1

    def _drop(self, adapter: _Adapter) -> None:
        self._evict(adapter)
        self._adapters.pop(adapter.name, None)
