"""Multi-LoRA over HTTP: the official ``openai`` client selects adapters with ``model: "base:adapter"`` or
``"adapter"``, ``/v1/models`` lists them, adapters load and unload at run time (also while a request streams),
unknown ones are 404s and bad ones 400s; the app runs two ingress replicas, and a load or unload answered by one
is served by both; the router's adapter preference on plain data."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from sgl_ray.deployments.router import rank_replicas

from ..engine.prompts import PROMPTS

pytestmark = [pytest.mark.serve, pytest.mark.slow]

NEW = 6


class _Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self._body = status, body

    def json(self):
        return json.loads(self._body)


class http:  # noqa: N801  (POST over urllib)
    @staticmethod
    def post(url: str, json: dict) -> _Reply:
        req = urllib.request.Request(url, data=_dumps(json), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req) as r:
                return _Reply(r.status, r.read())
        except urllib.error.HTTPError as e:
            return _Reply(e.code, e.read())


def _dumps(body: dict) -> bytes:
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def lora_url(serve_url, tiny_llama_path, lora_adapters):
    from ray import serve

    from sgl_ray.deployments import build_openai_app

    app = build_openai_app(
        {
            "model_path": tiny_llama_path,
            "max_total_tokens": 2048,
            "served_model_name": "tiny",
            "lora_paths": [f"a0={lora_adapters['a0']}", f"a1={lora_adapters['a1']}"],
            "max_lora_rank": 16,
            "ingress_replicas": 2,
        }
    )
    serve.run(app, name="lora", route_prefix="/lora")
    yield f"{serve_url}/lora"
    serve.delete("lora")


@pytest.fixture(scope="module")
def lclient(lora_url):
    return openai.OpenAI(base_url=f"{lora_url}/v1", api_key="unused", max_retries=0)


def test_models_list_adapters_and_selection_matches_peft(lclient, lora_url, peft_reference, tiny_llama_path):
    models = {m.id: m for m in lclient.models.list().data}
    assert set(models) == {"tiny", "a0", "a1"}
    assert models["a0"].model_extra["parent"] == "tiny"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    ids = tok.encode(PROMPTS[1])
    for model, adapter in (("tiny", None), ("tiny:a0", "a0"), ("a1", "a1")):
        r = lclient.completions.create(model=model, prompt=ids, max_tokens=NEW, temperature=0)
        assert r.usage.completion_tokens == NEW
        assert r.choices[0].text == tok.decode(peft_reference(adapter, ids, NEW))
    native = http.post(
        f"{lora_url}/generate",
        json={
            "input_ids": ids,
            "lora_path": "a1",
            "sampling_params": {"max_new_tokens": NEW, "temperature": 0},
        },
    ).json()
    assert native["output_ids"] == peft_reference("a1", ids, NEW)


def test_unknown_and_bad_adapters(lclient, lora_url, tmp_path):
    for model in ("tiny:nope", "nope", "other:a0"):
        with pytest.raises(openai.NotFoundError):
            lclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
    r = http.post(f"{lora_url}/generate", json={"text": "hi", "lora_path": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post(f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    r = http.post(f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 400
    r = http.post(f"{lora_url}/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404
    assert lclient.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def _adapter_dir(root, name: str, source: str, files: dict[str, bytes]) -> str:
    """``source``'s ``adapter_config.json`` next to the given weight files."""
    import shutil
    from pathlib import Path

    directory = Path(root) / name
    directory.mkdir()
    shutil.copy(Path(source) / "adapter_config.json", directory)
    for file, data in files.items():
        (directory / file).write_bytes(data)
    return str(directory)


def test_corrupt_and_pickled_adapters_are_400s(lclient, lora_url, lora_adapters, tiny_llama_path, tmp_path):
    import io
    import os
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from sgl_ray.errors import InvalidRequestError
    from sgl_ray.lora.adapter import check_adapter

    source = lora_adapters["a0"]
    pickle = io.BytesIO()
    torch.save(load_file(str(Path(source) / "adapter_model.safetensors")), pickle)
    corrupt = _adapter_dir(tmp_path, "corrupt", source, {"adapter_model.safetensors": os.urandom(4096)})
    truncated = (Path(source) / "adapter_model.safetensors").read_bytes()[:1000]
    cut = _adapter_dir(tmp_path, "cut", source, {"adapter_model.safetensors": truncated})
    pickled = _adapter_dir(tmp_path, "pickled", source, {"adapter_model.bin": pickle.getvalue()})
    garbage = _adapter_dir(tmp_path, "garbage", source, {"adapter_model.bin": os.urandom(4096)})
    bad_config = _adapter_dir(tmp_path, "bad_config", source, {"adapter_model.safetensors": b""})
    (Path(bad_config) / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "eight"}))
    cases = [(corrupt, "unreadable"), (cut, "unreadable"), (pickled, "pickle"), (garbage, "pickle")]
    for path, words in [*cases, (bad_config, "bad value")]:
        r = http.post(f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
        assert r.status_code == 400, (path, r.json())
        err = r.json()["error"]
        assert words in err["message"] and err["param"] == "lora_path", err
    assert "bad" not in {m.id for m in lclient.models.list().data}
    assert lclient.completions.create(model="tiny:a0", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    # with lora_allow_pickle (--lora-allow-pickle) a pickled adapter loads; a corrupt pickle is still a 400
    hf_config = AutoConfig.from_pretrained(tiny_llama_path)
    assert check_adapter(pickled, hf_config, 16, allow_pickle=True).rank == 8
    with pytest.raises(InvalidRequestError, match="unreadable"):
        check_adapter(garbage, hf_config, 16, allow_pickle=True)


def test_load_and_unload_while_streaming(lclient, lora_url, lora_adapters, peft_reference, tiny_llama_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    ids = tok.encode(PROMPTS[5])
    r = http.post(
        f"{lora_url}/v1/load_lora_adapter",
        json={"lora_name": "a2", "lora_path": lora_adapters["a2"], "pinned": True},
    )
    assert r.status_code == 200 and r.json()["success"]
    assert "a2" in {m.id for m in lclient.models.list().data}
    stream = lclient.completions.create(
        model="tiny:a2", prompt=ids, max_tokens=NEW, temperature=0, stream=True
    )
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    assert http.post(f"{lora_url}/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tok.decode(peft_reference("a2", ids, NEW))  # the running stream finished with its adapter
    with pytest.raises(openai.NotFoundError):
        lclient.completions.create(model="tiny:a2", prompt=ids, max_tokens=2)
    assert "a2" not in {m.id for m in lclient.models.list().data}
    # the replica followed: a0 still works, and a2 can come back under the same name
    assert http.post(
        f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": lora_adapters["a2"]}
    ).json()["success"]
    r = lclient.completions.create(model="a2", prompt=ids, max_tokens=NEW, temperature=0)
    assert r.choices[0].text == tok.decode(peft_reference("a2", ids, NEW))


def test_both_ingress_replicas_follow_loads_and_unloads(
    lclient, lora_url, lora_adapters, peft_reference, tiny_llama_path
):
    """Serve's proxy spreads requests over the two ingress replicas: every request after a load (unload) answered
    by one of them must see the adapter (its absence), whichever replica serves it. The registry also reports
    which version each ingress replica holds: both hold the change as soon as the HTTP call returned."""
    from ray import serve
    from transformers import AutoTokenizer

    registry = serve.get_deployment_handle("LoRARegistry", app_name="lora")

    def held_versions() -> tuple[int, list]:
        status = registry.status.remote().result()
        return status["version"], sorted(status["ingresses"].values())

    deadline = time.monotonic() + 30  # both replicas join the registry when they start
    while len(held_versions()[1]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    ids = tok.encode(PROMPTS[3])
    want = tok.decode(peft_reference("a3", ids, NEW))

    r = http.post(
        f"{lora_url}/v1/load_lora_adapter", json={"lora_name": "shared", "lora_path": lora_adapters["a3"]}
    )
    assert r.status_code == 200
    version, held = held_versions()
    assert held == [version, version]
    for _ in range(6):
        assert "shared" in {m.id for m in lclient.models.list().data}
    for model in ("shared", "tiny:shared", "shared", "tiny:shared"):
        r = lclient.completions.create(model=model, prompt=ids, max_tokens=NEW, temperature=0)
        assert r.choices[0].text == want
    native = http.post(
        f"{lora_url}/generate",
        json={
            "input_ids": ids,
            "lora_path": "shared",
            "sampling_params": {"max_new_tokens": NEW, "temperature": 0},
        },
    )
    assert native.json()["output_ids"] == peft_reference("a3", ids, NEW)

    assert http.post(f"{lora_url}/v1/unload_lora_adapter", json={"lora_name": "shared"}).status_code == 200
    version, held = held_versions()
    assert held == [version, version]
    for _ in range(4):
        assert "shared" not in {m.id for m in lclient.models.list().data}
        with pytest.raises(openai.NotFoundError):
            lclient.completions.create(model="shared", prompt=ids, max_tokens=2)
    r = http.post(f"{lora_url}/generate", json={"input_ids": ids, "lora_path": "shared"})
    assert r.status_code == 404


def test_router_prefers_replicas_holding_the_adapter():
    ids = list(range(100, 170))
    stats = {
        "idle": {"num_running": 0, "lora_adapters": []},
        "holder": {"num_running": 2, "lora_adapters": ["sql"]},
        "busy_holder": {"num_running": 30, "lora_adapters": ["sql"]},
    }
    assert rank_replicas(stats, {"prompts": [ids], "lora_name": "sql"}, 8) == (
        [["holder", "busy_holder"], ["idle"]],
        "adapter",
    )
    assert rank_replicas(stats, {"prompts": [ids], "lora_name": "chat"}, 8)[1] == "load"
    assert rank_replicas(stats, {"prompts": [ids]}, 8) == ([["idle", "holder", "busy_holder"]], "load")
    # a cached prefix counts only in its adapter's namespace
    from sgl_ray.mem_cache.prefix_hash import block_hashes

    stats["idle"]["prefix_blocks"] = frozenset(block_hashes(ids, 32, "chat"))
    assert rank_replicas(stats, {"prompts": [ids], "lora_name": "chat"}, 8)[0][0] == ["idle"]
    assert rank_replicas(stats, {"prompts": [ids], "lora_name": "sql"}, 8)[1] == "adapter"
    assert rank_replicas(stats, {"prompts": [ids]}, 8)[1] == "load"
