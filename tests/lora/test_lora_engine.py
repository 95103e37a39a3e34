"""Multi-LoRA in the in-process engine: greedy outputs equal transformers + peft per adapter, mixed batches equal
single runs, the prefix cache never shares KV across adapters, hot load/unload, LRU eviction, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import sgl_ray
from sgl_ray.errors import InvalidRequestError, ModelNotFoundError

from ..engine.prompts import PROMPTS, SHARED_PREFIX
from .adapters import ADAPTERS

NEW = 8
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_llama_path, lora_adapters):
    paths = [f"{n}={p}" for n, p in lora_adapters.items()]
    with sgl_ray.Engine(
        tiny_llama_path,
        lora_paths=paths,
        max_loras_per_batch=4,
        max_total_tokens=4096,
        chunked_prefill_size=32,
    ) as eng:
        yield eng


def _ids(engine, texts):
    return [engine.tokenizer.encode(t) for t in texts]


def test_each_adapter_matches_peft(engine, peft_reference):
    prompts = _ids(engine, PROMPTS[1:4])
    for name in [None, *ADAPTERS]:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=name)
        for ids, out in zip(prompts, outs, strict=True):
            assert out["output_ids"] == peft_reference(name, ids, NEW), (name, len(ids))
    # the adapters change the model's answers (a zero adapter would pass the check above trivially)
    base = peft_reference(None, prompts[2], NEW)
    assert sum(peft_reference(n, prompts[2], NEW) != base for n in ADAPTERS) >= 3


def test_mixed_batch_equals_single_runs(engine, peft_reference):
    prompts = _ids(engine, PROMPTS[4:9])
    names = [*ADAPTERS, None]  # 4 adapters + the base model in one batch
    mixed = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=names)
    for ids, name, out in zip(prompts, names, mixed, strict=True):
        single = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path=name)
        assert out["output_ids"] == single["output_ids"] == peft_reference(name, ids, NEW)


def test_prefix_cache_is_keyed_by_adapter(engine):
    ids = engine.tokenizer.encode(SHARED_PREFIX + " Q: Name a prime number. A:")
    first = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="a0")
    assert first["meta_info"]["cached_tokens"] == 0
    again = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="a0")
    assert again["meta_info"]["cached_tokens"] > 20
    # the same tokens under another adapter or the base model reuse nothing computed under a0
    for other in ("a1", None):
        out = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path=other)
        assert out["meta_info"]["cached_tokens"] == 0


def test_unknown_adapter_and_bad_adapters(engine, tmp_path, lora_adapters):
    with pytest.raises(ModelNotFoundError, match="nope"):
        engine.generate("Hi", GREEDY, lora_path="nope")
    with pytest.raises(InvalidRequestError, match="adapter_config.json"):
        engine.load_lora_adapter("missing", str(tmp_path))
    with pytest.raises(InvalidRequestError, match="already loaded"):
        engine.load_lora_adapter("a0", lora_adapters["a0"])
    with pytest.raises(ModelNotFoundError):
        engine.unload_lora_adapter("nope")
    assert engine.generate("Hi", GREEDY)["meta_info"]["completion_tokens"] == NEW  # still serving


def test_hot_load_evicts_lru_and_unload_waits_for_streams(engine, peft_reference, lora_adapters, tmp_path):
    ids = _ids(engine, PROMPTS[9:10])[0]
    copy = shutil.copytree(lora_adapters["a2"], tmp_path / "a2copy")
    # a 5th adapter with 4 slots: pinned, so it loads now and evicts the least recently used one
    engine.load_lora_adapter("extra", str(copy), pinned=True)
    listed = engine.list_lora_adapters()
    assert set(listed) == {*ADAPTERS, "extra"} and listed["extra"]["pinned"] and listed["extra"]["loaded"]
    assert sum(a["loaded"] for a in listed.values()) == 4
    assert engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="extra")["output_ids"] == (
        peft_reference("a2", ids, NEW)
    )
    # every adapter still gives its own answer after evictions and reloads
    for name in ADAPTERS:
        out = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path=name)
        assert out["output_ids"] == peft_reference(name, ids, NEW)
    # unloading while a request streams with the adapter: deferred, the stream finishes intact
    stream = engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="extra", stream=True)
    tokens = next(stream)["output_ids"]
    assert engine.unload_lora_adapter("extra") is False
    with pytest.raises(ModelNotFoundError):
        engine.generate(input_ids=ids, sampling_params=GREEDY, lora_path="extra")
    tokens += [t for chunk in stream for t in chunk["output_ids"]]
    assert tokens == peft_reference("a2", ids, NEW)
    assert "extra" not in engine.list_lora_adapters()
    engine.load_lora_adapter("extra", str(copy))  # the name is free again
    assert engine.unload_lora_adapter("extra") is True


def test_lora_needs_enable(tiny_llama_path, lora_adapters):
    with sgl_ray.Engine(tiny_llama_path, max_total_tokens=512) as eng:
        with pytest.raises(InvalidRequestError, match="not enabled"):
            eng.load_lora_adapter("a0", lora_adapters["a0"])
        with pytest.raises(InvalidRequestError, match="not enabled"):
            eng.generate("Hi", GREEDY, lora_path="a0")


def test_bench_lora_cli(tiny_llama_path, tmp_path, capsys):
    from sgl_ray.cli import main

    out_file = tmp_path / "lora.jsonl"
    argv = ["bench", "lora", "--model-path", tiny_llama_path, "--adapters", "1", "3", "--num-prompts", "6"]
    argv += [
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--max-total-tokens",
        "1024",
        "--output-file",
        str(out_file),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "lora-3" in table and "sgl_ray-base" in table
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["params"]["num_adapters"] for r in records] == [1, 3]
    assert all(r["systems"]["sgl_ray-base"]["output_tokens"] == 24 for r in records)
    assert records[1]["systems"]["sgl_ray-3-lora"]["output_tokens"] == 24 and records[1]["ratio"] > 0


@pytest.fixture(scope="module")
def gpu_lora_setup(tmp_path_factory):
    """The tiny Llama without a tokenizer (the GPU machine has no default model) and the four adapters on it."""
    pytest.importorskip("peft")
    from ..conftest import save_tiny_model, tiny_llama_config
    from .adapters import PeftReference, make_adapter

    base = save_tiny_model(tiny_llama_config(), tmp_path_factory.mktemp("gpu_llama"), None)
    root = tmp_path_factory.mktemp("gpu_lora")
    adapters = {
        name: make_adapter(base, root / name, *spec, seed=i)
        for i, (name, spec) in enumerate(ADAPTERS.items())
    }
    return base, adapters, PeftReference(base, adapters)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_triton_lora_engine_matches_peft_on_gpu(gpu_lora_setup, cuda_graphs):
    """The CUDA engine (Triton LoRA and attention kernels, fp32; decode replayed from the LoRA graph ladder or run
    eagerly) against transformers + peft on the CPU: a mixed batch of four adapters and the base model."""
    base, adapters, reference = gpu_lora_setup
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 49152, (n,), generator=g).tolist() for n in (3, 9, 17, 30, 5) * 2]
    names = [*ADAPTERS, None] * 2
    with sgl_ray.Engine(
        base,
        device="cuda",
        dtype="float32",
        skip_tokenizer_init=True,
        lora_paths=[f"{n}={p}" for n, p in adapters.items()],
        max_total_tokens=4096,
        disable_cuda_graph=not cuda_graphs,
    ) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=names)
        runner = eng._core.runner
        if cuda_graphs:
            assert runner.cuda_graphs is not None and runner.cuda_graphs.lora is not None
            assert runner.cuda_graphs.num_replays >= NEW - 2  # the decode steps replayed from graphs
    for ids, name, out in zip(prompts, names, outs, strict=True):
        assert out["output_ids"] == reference(name, ids, NEW), name
