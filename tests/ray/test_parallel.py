"""Tensor, pipeline and data parallelism over Ray actors: greedy outputs token-identical to one shard and to
transformers, with prefix-cache hits and small prefill chunks."""

from __future__ import annotations

import pytest

import sgl_ray

from ..engine.prompts import PROMPTS, SHARED_PREFIX

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NEW = 10
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


def _token_lists(engine) -> list[list[int]]:
    tok = engine.tokenizer
    prefix = tok.encode(SHARED_PREFIX)
    shared = [prefix + tok.encode(q) for q in (" Q: Who wrote Hamlet? A:", " Q: Largest ocean? A:")]
    return [tok.encode(p) for p in PROMPTS[:8]] + shared


def _check_exact(engine, reference, token_lists):
    outs = engine.generate(input_ids=token_lists, sampling_params=GREEDY)
    for ids, out in zip(token_lists, outs, strict=True):
        assert out["output_ids"] == reference(ids, NEW), f"mismatch for a {len(ids)}-token prompt"
    return outs


@pytest.mark.parametrize(
    ("name", "tp", "pp"),
    [
        # Qwen2: QKV biases split over the tensor-parallel ranks, 3 layers split unevenly over 2 stages, each
        # stage reading its layers from sharded safetensors.
        ("qwen2", 2, 2),
        # Qwen3: q/k norms on split heads, tied embeddings (the first stage embeds, the last one projects).
        ("qwen3", 2, 2),
        # Llama at tp2 is tests/ray/test_overlap.py's model (greedy against transformers, prefill chunks of 16).
        # SmolLM2's head layout (3 KV heads: tensor parallelism needs a divisor of 3) on a 4-layer model; the real
        # SmolLM2 runs in-process in tests/engine/test_greedy_exact.py
        ("llama_3kv", 1, 2),
        ("llama_3kv", 3, 1),
    ],
)
def test_parallel_greedy_matches_transformers(
    name, tp, pp, ray_cluster, hf_reference, tiny_llama_3kv_path, tiny_qwen2_path, tiny_qwen3_path
):
    path = {
        "llama_3kv": tiny_llama_3kv_path,
        "qwen2": tiny_qwen2_path,
        "qwen3": tiny_qwen3_path,
    }
    with sgl_ray.Engine(
        path[name], tp_size=tp, pp_size=pp, chunked_prefill_size=16, max_total_tokens=4096
    ) as eng:
        token_lists = _token_lists(eng)
        ref = hf_reference(name)
        _check_exact(eng, ref, token_lists)
        again = _check_exact(eng, ref, token_lists[-2:])  # the shared few-shot prefix is now cached
        assert all(o["meta_info"]["cached_tokens"] > 20 for o in again)
        stats = eng.get_stats()
        assert stats["num_running"] == 0
        if pp == 1:
            assert stats["control_overhead_steps"] > 0
        else:  # micro-batches: one per stage in flight, so the stages overlap
            assert stats["max_batches_in_flight"] == pp


def test_data_parallel_groups_match_transformers(ray_cluster, tiny_qwen2_path, hf_reference):
    """Each data-parallel group is the size-one Ray engine (``use_ray=True``, one shard actor and its scheduler
    actor): both groups serve requests, token-identical to transformers."""
    ref = hf_reference("qwen2")
    with sgl_ray.Engine(tiny_qwen2_path, dp_size=2, max_total_tokens=2048) as eng:
        token_lists = [eng.tokenizer.encode(p) for p in PROMPTS[:8]]
        _check_exact(eng, ref, token_lists)
        groups = eng.get_stats()["groups"]
        assert len(groups) == 2
        # Both groups served requests: each holds cached KV from its share of the prompts.
        assert all(g["cache_size"] > 0 for g in groups)


def test_auto_device_follows_the_cluster_not_the_process(ray_cluster):
    """``device="auto"`` means the cluster's GPUs when there are any: the scheduler actor, which holds none, must
    not start its shards on the CPU of a GPU cluster. An explicit device is kept."""
    import ray
    import torch

    from sgl_ray.actors.ray_core import resolve_device
    from sgl_ray.configs.engine_args import EngineArgs

    cluster_has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    assert cluster_has_gpu == torch.cuda.is_available()  # the test cluster is this machine
    assert resolve_device(EngineArgs(device="auto")).device == ("cuda" if cluster_has_gpu else "cpu")
    assert resolve_device(EngineArgs(device="cpu")).device == "cpu"
