"""The app's LoRA registry on its own (no Serve): a change is answered only once every live ingress watching it
holds the new version; an ingress that stopped calling holds a change up by ``ack_timeout_s`` at most; refused
changes leave the version alone; snapshots order by epoch and version; the ``ingress_replicas`` option."""

from __future__ import annotations

import asyncio
import types

import pytest

from sgl_ray.deployments.lora import AdapterSnapshot
from sgl_ray.deployments.lora_ingress import IngressAdapters
from sgl_ray.deployments.lora_registry import LoRARegistry
from sgl_ray.errors import InvalidRequestError, ModelNotFoundError


async def _follow(registry: LoRARegistry, ingress_id: str, seen: list[AdapterSnapshot]) -> None:
    """What an ingress replica does: watch, keep the answer, watch again with the version it now holds."""
    have = None
    while True:
        snapshot = await registry.watch(ingress_id, have)
        seen.append(snapshot)
        have = (snapshot.epoch, snapshot.version)


def test_change_is_answered_once_every_ingress_holds_it():
    async def scenario():
        registry = LoRARegistry({"a": ("/adapters/a", False)}, poll_s=30.0, ack_timeout_s=30.0)
        seen: dict[str, list[AdapterSnapshot]] = {"i1": [], "i2": []}
        tasks = [asyncio.create_task(_follow(registry, i, s)) for i, s in seen.items()]
        while (await registry.status())["ingresses"] != {
            "i1": 0,
            "i2": 0,
        }:  # both hold version 0 and are watching
            await asyncio.sleep(0.01)
        # the watches are parked for 30 s; the change must wake them, not wait for the poll to end
        added = await asyncio.wait_for(registry.add("b", "/adapters/b", True), 10)
        assert added.version == 1 and added.adapters == {
            "a": ("/adapters/a", False),
            "b": ("/adapters/b", True),
        }
        assert (await registry.status())["ingresses"] == {
            "i1": 1,
            "i2": 1,
        }  # both confirmed before add returned
        assert all(s[-1] == added for s in seen.values())
        removed = await asyncio.wait_for(registry.remove("a"), 10)
        assert (await registry.status())["ingresses"] == {"i1": 2, "i2": 2}
        assert all(s[-1] == removed and "a" not in s[-1].adapters for s in seen.values())
        for t in tasks:
            t.cancel()

    asyncio.run(scenario())


def test_an_ingress_that_stopped_calling_holds_changes_up_briefly():
    async def scenario():
        registry = LoRARegistry({}, poll_s=30.0, ack_timeout_s=0.3)
        live: list[AdapterSnapshot] = []
        task = asyncio.create_task(_follow(registry, "live", live))
        await registry.watch("gone", None)  # called once, never again (its replica died)
        while not live:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = await asyncio.wait_for(registry.add("x", "/adapters/x", False), 10)
        assert loop.time() - started >= 0.3  # waited for "gone", then gave up
        assert live[-1] == first and (await registry.snapshot()) == first
        assert "gone" not in (await registry.status())["ingresses"]  # no longer counted as live
        second = await asyncio.wait_for(registry.remove("x"), 10)
        assert second.version == 2 and live[-1] == second
        task.cancel()

    asyncio.run(scenario())


def test_refused_changes_keep_the_version():
    async def scenario():
        registry = LoRARegistry({"a": ("/adapters/a", False)})
        with pytest.raises(InvalidRequestError, match="already loaded"):
            await registry.add("a", "/adapters/other", False)
        with pytest.raises(ModelNotFoundError):
            await registry.remove("nope")
        assert (await registry.snapshot()).version == 0
        assert (await registry.snapshot()).adapters == {"a": ("/adapters/a", False)}

    asyncio.run(scenario())


class _Handle:
    """How an ingress reaches the registry through Serve (``handle.method.remote(*args)``, awaited), pointed at a
    registry object the test can replace, as Serve does when it restarts the registry's replica."""

    def __init__(self, registry: LoRARegistry) -> None:
        self.registry = registry

    def __getattr__(self, name: str):
        return types.SimpleNamespace(remote=lambda *args: getattr(self.registry, name)(*args))


def test_ingresses_redo_runtime_changes_on_a_restarted_registry():
    async def scenario():
        start = {"a": ("/adapters/a", False)}
        handle = _Handle(LoRARegistry(start, poll_s=0.2, ack_timeout_s=5.0))
        ingresses = [IngressAdapters("base", None, 16, True, handle, {}) for _ in range(2)]
        for ingress in ingresses:
            await ingress.ready()
        await handle.registry.add("b", "/adapters/b", True)  # loaded at run time
        await handle.registry.remove("a")  # and an acknowledged unload
        assert all(i.adapters == {"b": ("/adapters/b", True)} for i in ingresses)

        # Serve restarts the registry's replica: a new epoch, the start table
        handle.registry = LoRARegistry(start, poll_s=0.2, ack_timeout_s=5.0)
        async with asyncio.timeout(10):
            while (await handle.registry.snapshot()).adapters.get("b") != ("/adapters/b", True) or any(
                "b" not in i.adapters for i in ingresses
            ):
                await asyncio.sleep(0.05)
        async with asyncio.timeout(10):  # and "a", which the start table brought back, unloaded again
            while "a" in (await handle.registry.snapshot()).adapters or any(
                "a" in i.adapters for i in ingresses
            ):
                await asyncio.sleep(0.05)
        restored = await handle.registry.snapshot()
        assert restored.adapters == {"b": ("/adapters/b", True)}
        assert restored.version == 2  # each change redone once, although both ingresses tried
        for ingress in ingresses:
            ingress.close()

    asyncio.run(scenario())


def test_snapshot_order():
    old = AdapterSnapshot("e1", 3, {})
    assert AdapterSnapshot("e1", 4, {}).newer_than(old)
    assert not AdapterSnapshot("e1", 3, {}).newer_than(old)
    assert not AdapterSnapshot("e1", 2, {}).newer_than(old)  # a call that left before the change
    assert AdapterSnapshot("e2", 0, {}).newer_than(old)  # a restarted registry
    assert old.newer_than(None)


def test_ingress_replicas_option(tiny_llama_path):
    """``--ingress-replicas`` reaches the builder; bad values are refused before anything is deployed (the Serve
    test in ``test_lora_serve.py`` runs an app with two)."""
    import argparse

    from sgl_ray.deployments import build_openai_app
    from sgl_ray.deployments.serve_cli import add_serve_args, app_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = app_args(parser.parse_args(["--model-path", tiny_llama_path, "--ingress-replicas", "3"]))
    assert args["ingress_replicas"] == 3
    assert type(build_openai_app(args)).__name__ == "Application"
    for bad in (0, -1, "2", 1.5, True):
        with pytest.raises(InvalidRequestError, match="ingress_replicas"):
            build_openai_app({"model_path": tiny_llama_path, "ingress_replicas": bad})
