"""Multi-LoRA on Ray shard actors: with TP=2 each shard loads its slice of every adapter, and a mixed batch gives
the same greedy tokens as one process (and as transformers + peft); adapters hot-loaded at run time reach every
shard of the group."""

from __future__ import annotations

import pytest

import sgl_ray
from sgl_ray.errors import ModelNotFoundError

from ..engine.prompts import PROMPTS
from .adapters import ADAPTERS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NEW = 8
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


def test_tensor_parallel_lora_equals_single_shard(
    ray_cluster, tiny_llama_path, lora_adapters, peft_reference
):
    names = [*ADAPTERS, None, "a1"]
    initial = [f"{n}={lora_adapters[n]}" for n in ("a0", "a1")]
    with sgl_ray.Engine(
        tiny_llama_path, tp_size=2, lora_paths=initial, max_lora_rank=16, max_total_tokens=2048
    ) as eng:
        for name in ("a2", "a3"):  # hot-loaded: registered with the scheduler actor, loaded by both shards
            eng.load_lora_adapter(name, lora_adapters[name])
        prompts = [eng.tokenizer.encode(p) for p in PROMPTS[:6]]
        outs = eng.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=names)
        with sgl_ray.Engine(
            tiny_llama_path, lora_paths=initial, max_lora_rank=16, max_total_tokens=2048
        ) as single:
            for name in ("a2", "a3"):
                single.load_lora_adapter(name, lora_adapters[name])
            ref = single.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=names)
        for ids, name, out, one in zip(prompts, names, outs, ref, strict=True):
            assert out["output_ids"] == one["output_ids"] == peft_reference(name, ids, NEW), name
        assert set(eng.list_lora_adapters()) == set(ADAPTERS)
        assert eng.unload_lora_adapter("a3") is True
        with pytest.raises(ModelNotFoundError):
            eng.generate(input_ids=prompts[0], sampling_params=GREEDY, lora_path="a3")
