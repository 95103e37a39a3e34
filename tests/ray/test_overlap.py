"""Overlap scheduling through the Ray actors (one pipeline stage): two steps in flight, outputs token-identical to
overlap off and to transformers at tensor-parallel sizes 1 and 2, with requests that end early while their next
step is already on the shards, and requests arriving while others decode. Constrained requests run ahead too (their
masks follow the plan): the tokens of one step at a time, with and without jump-forward, in mixed batches, through
an abort and a lost shard."""

from __future__ import annotations

import json
import pickle
import re
import threading

import jsonschema
import numpy as np
import pytest
import ray
import torch
from ray.dag import InputNode, MultiOutputNode
from transformers import LlamaConfig

import sgl_ray
from sgl_ray.actors.shard_worker import DeferredMasks, owned
from sgl_ray.cli import main
from sgl_ray.sampling.bitmask import unpack_bitmask
from sgl_ray.scheduler.plan import StepOutput

from ..conftest import save_config_only_llama
from ..engine.prompts import PROMPTS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NEW = 12
LONG = 40  # new tokens of the request that is decoding when the others arrive


def _greedy(new: int = NEW, **extra) -> dict:
    return {"temperature": 0.0, "max_new_tokens": new, "ignore_eos": True, **extra}


@pytest.fixture(scope="module")
def engines(ray_cluster, tiny_llama_path):
    """``{overlap on: engine}`` over two tensor-parallel shard actors; small prefill chunks, so batches mix
    prefill and decode. (One-shard Ray engines run with overlap on in every Serve test.)"""
    kwargs = dict(tp_size=2, use_ray=True, chunked_prefill_size=16, max_total_tokens=4096)
    on = sgl_ray.Engine(tiny_llama_path, **kwargs)
    off = sgl_ray.Engine(tiny_llama_path, disable_overlap_schedule=True, **kwargs)
    yield {True: on, False: off}
    on.shutdown()
    off.shutdown()


def _mixed_arrivals(engine) -> dict[str, list[int]]:
    """One long request streams; after its third chunk a batch of prompts (1 to 12 new tokens) arrives."""
    tok = engine.tokenizer
    late = [tok.encode(p) for p in PROMPTS[:8]]
    results: dict[str, list[int]] = {}
    threads: list[threading.Thread] = []

    def run_late() -> None:
        outs = engine.generate(
            input_ids=late, sampling_params=[_greedy(1 + (3 * i) % NEW) for i in range(len(late))]
        )
        for i, out in enumerate(outs):
            results[f"late{i}"] = out["output_ids"]

    ids: list[int] = []
    for i, chunk in enumerate(
        engine.generate(input_ids=tok.encode(PROMPTS[3]), sampling_params=_greedy(LONG), stream=True)
    ):
        ids += chunk["output_ids"]
        if i == 2:
            threads.append(threading.Thread(target=run_late))
            threads[0].start()
    for t in threads:
        t.join(timeout=120)
    results["long"] = ids
    return results


def test_greedy_matches_overlap_off_and_transformers(engines, hf_reference):
    ref = hf_reference("llama")
    tok = engines[True].tokenizer
    expected = {"long": ref(tok.encode(PROMPTS[3]), LONG)}
    for i, p in enumerate(PROMPTS[:8]):
        expected[f"late{i}"] = ref(tok.encode(p), 1 + (3 * i) % NEW)
    for overlap, engine in engines.items():
        got = _mixed_arrivals(engine)
        assert got == expected, f"overlap={overlap}"
        stats = engine.get_stats()
        assert stats["overlap_schedule"] is overlap
        # Overlap keeps the next step on the shards while the scheduler processes the previous one.
        assert stats["max_batches_in_flight"] == (2 if overlap else 1)
        assert stats["control_overhead_steps"] > 0 and stats["control_overhead_us_p50"] > 0
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0


def test_early_stops_match_overlap_off(engines, hf_reference):
    """A request whose token ends it (EOS, stop token, stop string, max_tokens 1) has its next step already in
    flight with overlap on: that step's token is dropped and its KV returned, as without overlap."""
    ref = hf_reference("llama")
    tok = engines[True].tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[8:13]]
    full = [ref(ids, NEW) for ids in prompts]
    text = tok.decode(full[1])
    params = [
        _greedy(stop_token_ids=[full[0][2]]),
        _greedy(stop=[text[6:10]]),
        _greedy(1),
        {"temperature": 0.9, "seed": 7, "max_new_tokens": NEW},  # seeded sampling: the same on every rank
        {"temperature": 0.0, "max_new_tokens": NEW},  # ends on EOS
    ]
    eos = full[4][3]  # a random-weight model rarely samples its EOS: make a token this prompt reaches one
    outs = {}
    for overlap, engine in engines.items():
        model_eos = engine.eos_token_ids
        engine.eos_token_ids = (*model_eos, eos)
        try:
            outs[overlap] = engine.generate(input_ids=prompts, sampling_params=params)
        finally:
            engine.eos_token_ids = model_eos
    for on, off in zip(outs[True], outs[False], strict=True):
        assert on["output_ids"] == off["output_ids"]
        assert on["text"] == off["text"]
        assert on["meta_info"]["finish_reason"] == off["meta_info"]["finish_reason"]
    stop_tok, stop_str, one, _, at_eos = outs[True]
    assert at_eos["output_ids"] == full[4][: full[4].index(eos) + 1]
    assert at_eos["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    assert stop_tok["output_ids"] == full[0][:3]
    assert stop_tok["meta_info"]["finish_reason"] == {"type": "stop", "matched": full[0][2]}
    assert stop_str["meta_info"]["finish_reason"]["type"] == "stop" and len(stop_str["output_ids"]) < NEW
    assert one["output_ids"] == full[2][:1]
    for engine in engines.values():  # nothing leaked: every KV slot is free or held by the prefix cache
        stats = engine.get_stats()
        assert stats["num_running"] == 0
        assert stats["kv_free"] + stats["cache_size"] == stats["kv_capacity"]


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 6}}}
WORD = "[a-z]{3,9}"
WORDS = f"{WORD}( {WORD}){{7}}"  # eight words: a constrained request of many steps


def _constrained_batch() -> tuple[list[str], list[dict]]:
    """Greedy JSON, seeded sampled regex and plain greedy requests in one batch."""
    params = [{"temperature": 0.0, "max_new_tokens": 40, "json_schema": json.dumps(SCHEMA)}] * 2
    params += [{"temperature": 0.8, "seed": 5, "max_new_tokens": 40, "regex": WORD}] * 2
    params += [{"temperature": 0.0, "max_new_tokens": 40, "regex": WORDS}, _greedy(), _greedy(5)]
    return [f"Item {i}:" for i in range(len(params))], params


@pytest.fixture(scope="module")
def step_at_a_time(tiny_llama_path) -> list[dict]:
    """The constrained batch in-process, one step at a time: no overlap, no jump-forward."""
    prompts, params = _constrained_batch()
    kwargs = dict(disable_overlap_schedule=True, disable_jump_forward=True, max_total_tokens=4096)
    with sgl_ray.Engine(tiny_llama_path, **kwargs) as eng:
        return eng.generate(prompts, params)


def test_deferred_masks_travel_compact():
    """Only the constrained rows of a deferred step's masks cross the channel; the shards rebuild the scheduler's
    array exactly (None stays None: the step samples as if unconstrained)."""
    vocab = 100
    allowed = [{5, 40, 99}, set(range(vocab)), {0}]  # row 1: an unconstrained request in the batch
    dense = np.zeros((len(allowed), 32 * -(-vocab // 32)), dtype=bool)
    for row, tokens in enumerate(allowed):
        dense[row, list(tokens)] = True
    dense[1] = True  # the padding bits too, as the grammar tracker leaves rows it does not fill
    mask = np.packbits(dense, axis=1, bitorder="little").view(np.int32)  # [3, 4]
    packed = pickle.loads(pickle.dumps(DeferredMasks.pack(7, mask)))  # as the compiled graph's channel does
    assert packed.step_id == 7 and packed.rows.tolist() == [0, 2] and packed.bits.shape == (2, mask.shape[1])
    np.testing.assert_array_equal(packed.unpack(), mask)
    bits = unpack_bitmask(torch.from_numpy(packed.unpack()), vocab)
    assert [set(torch.nonzero(r).flatten().tolist()) for r in bits] == allowed
    assert DeferredMasks.pack(8, None).unpack() is None


def test_answers_kept_from_a_compiled_graph_do_not_hold_its_channel(ray_cluster):
    """An answer read from a compiled-graph channel views the channel's buffer, which stays taken while it
    lives; ``owned`` copies it out. So a receiver may keep an answer (here the first, over three times the
    graph's 10 calls in flight) and the writer never waits for the buffer it would hold."""

    @ray.remote(num_cpus=0)
    class Echo:
        def step(self, i: int) -> StepOutput:
            return StepOutput(step_id=i, next_token_ids=np.full(4, i, dtype=np.int64))

    actor = Echo.remote()
    with InputNode() as sent:
        dag = MultiOutputNode([actor.step.bind(sent)])
    dag = dag.experimental_compile()
    try:
        first = ray.get(dag.execute(0), timeout=60)[0]
        assert not first.next_token_ids.flags.writeable, "no longer a view of the channel: owned() may go"
        kept = owned(first)
        del first
        for i in range(1, 31):  # kept without the copy, the 10th would wait for good (timeout: a failure)
            assert ray.get(dag.execute(i), timeout=60)[0].next_token_ids.tolist() == [i] * 4
        assert (
            kept.step_id == 0
            and kept.next_token_ids.tolist() == [0] * 4
            and kept.next_token_ids.flags.writeable
        )
    finally:
        dag.teardown()
        ray.kill(actor)
    local = StepOutput(step_id=1, next_token_ids=np.arange(3))
    assert owned(local) is local and owned(None) is None  # built here: nothing to copy


def _deferred_steps(engine) -> int:
    return engine.get_stats()["num_deferred_mask_steps"]


def test_constrained_requests_run_ahead(engines, step_at_a_time, hf_reference):
    """With overlap a constrained request's next step goes to the shards before its token is back, its masks
    with the call after; every rank samples it under them. Greedy (jump-forward on: forced tokens verified) and
    seeded sampled requests give the tokens of one step at a time, next to unconstrained requests."""
    prompts, params = _constrained_batch()
    expected = [o["output_ids"] for o in step_at_a_time]
    for overlap, engine in engines.items():
        before = _deferred_steps(engine)
        outs = engine.generate(prompts, params)
        assert [o["output_ids"] for o in outs] == expected, f"overlap={overlap}"
        assert (_deferred_steps(engine) > before) is overlap
    for out in outs[:2]:
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert all(re.fullmatch(WORD, o["text"]) for o in outs[2:4])
    assert re.fullmatch(WORDS, outs[4]["text"])
    ref = hf_reference("llama")
    tok = engines[True].tokenizer
    assert outs[5]["output_ids"] == ref(tok.encode(prompts[5]), NEW)
    assert outs[6]["output_ids"] == ref(tok.encode(prompts[6]), 5)


def test_steps_long_after_the_last_deferred_one(ray_cluster, tiny_llama_path):
    """A constrained request ends early next to one that keeps decoding: dozens of calls go to the shards after
    the last deferred step. Answers read from a compiled-graph channel must not keep its buffer (an array still
    viewing it blocks the write of the 10th next answer there for good), so this ends, with no group rebuilt."""
    prompts = ["Item 0:", "Item 1:"]
    params = [{"temperature": 0.0, "max_new_tokens": 40, "regex": "[a-z]{3}"}, _greedy(3 * LONG)]
    kwargs = dict(disable_jump_forward=True, max_total_tokens=4096)
    with sgl_ray.Engine(tiny_llama_path, disable_overlap_schedule=True, **kwargs) as engine:  # in-process
        expected = [o["output_ids"] for o in engine.generate(prompts, params)]
    with sgl_ray.Engine(tiny_llama_path, use_ray=True, **kwargs) as engine:
        assert [o["output_ids"] for o in engine.generate(prompts, params)] == expected
        stats = engine.get_stats()
        assert stats["num_deferred_mask_steps"] > 0 and stats["num_rebuilds"] == 0
    assert len(expected[1]) - len(expected[0]) > 10  # more calls after the constrained request than buffers


def test_deferred_masks_without_jump_forward_through_abort_and_lost_shard(
    ray_cluster, tiny_llama_path, step_at_a_time
):
    """Jump-forward off: every constrained step after the first runs ahead. A constrained stream abandoned
    mid-way frees its KV; one whose shard dies mid-way (steps and their masks lost with the group) resumes from
    its tokens on the rebuilt group and ends as one step at a time would."""
    prompts, params = _constrained_batch()
    expected = [o["output_ids"] for o in step_at_a_time]
    kwargs = dict(use_ray=True, disable_jump_forward=True, max_total_tokens=4096)
    with sgl_ray.Engine(tiny_llama_path, **kwargs) as engine:
        assert [o["output_ids"] for o in engine.generate(prompts, params)] == expected
        assert _deferred_steps(engine) > 0

        stream = engine.generate(prompts[4], params[4], stream=True)
        next(stream)
        stream.close()  # aborted with a deferred step on the shards
        assert engine.generate(prompts[6], params[6])["output_ids"] == expected[6]
        stats = engine.get_stats()
        assert stats["num_running"] == 0 and stats["kv_free"] + stats["cache_size"] == stats["kv_capacity"]

        scheduler = engine._core.scheduler_actor()
        ids: list[int] = []
        for i, chunk in enumerate(engine.generate(prompts[4], params[4], stream=True)):
            ids += chunk["output_ids"]
            if i == 0:
                ray.kill(ray.get(scheduler.shard_handles.remote())[0], no_restart=True)
        assert ids == expected[4]
        assert engine.get_stats()["num_rebuilds"] == 1


def test_bench_roofline_through_ray_actors(ray_cluster, tmp_path, capsys):
    """``sgl-ray bench roofline --ray``: bs1 in-process, then through the Ray actors; on a CPU the GPU idle share
    is absent (the device records no step times), not zero."""
    model_dir = save_config_only_llama(tmp_path / "tiny")
    out = tmp_path / "roof.jsonl"
    argv = ["bench", "roofline", "--model-path", model_dir, "--load-format", "dummy", "--skip-hf"]
    argv += ["--skip-tokenizer-init", "--max-total-tokens", "2048", "--bs1-output-len", "8", "--ray"]
    assert main([*argv, "--output-file", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["workload"], r["system"]) for r in records] == [
        ("bs1 128/8", "sgl_ray"),
        ("bs1 128/8", "sgl_ray ray actors"),
    ]
    assert all(r["tok_s"] > 0 and r["output_tokens"] == 8 and r["gpu_idle"] is None for r in records)
    assert "| bs1 128/8 | sgl_ray ray actors |" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlap_through_ray_on_cuda(ray_cluster, tmp_path):
    """On a GPU (CUDA graphs on, placeholders resolved on the device): overlap gives the synchronous schedule's
    tokens through the Ray actors, also for requests a sampled stop token ends early; the shard's step trace
    yields an idle share."""
    LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        initializer_range=0.1,
    ).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 32000, (int(n),), generator=g).tolist() for n in torch.randint(3, 300, (6,))]
    kwargs = dict(use_ray=True, load_format="dummy", dtype="float32", skip_tokenizer_init=True)
    kwargs.update(max_total_tokens=16384, cuda_graph_max_bs=8, device="cuda")
    with sgl_ray.Engine(str(tmp_path), disable_overlap_schedule=True, **kwargs) as eng:
        free = eng.generate(input_ids=prompts, sampling_params=_greedy())
    params = [_greedy(stop_token_ids=[o["output_ids"][3 + i]]) for i, o in enumerate(free)]
    outs = {}
    for disable in (True, False):
        with sgl_ray.Engine(str(tmp_path), disable_overlap_schedule=disable, **kwargs) as eng:
            eng._core.start_step_trace()
            outs[disable] = eng.generate(input_ids=prompts, sampling_params=params)
            idle = eng._core.stop_step_trace()
            assert idle is not None and 0.0 <= idle < 1.0
    for sync, overlapped in zip(outs[True], outs[False], strict=True):
        assert overlapped["output_ids"] == sync["output_ids"]
        assert overlapped["meta_info"]["finish_reason"] == sync["meta_info"]["finish_reason"]
    assert any(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs[False])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_constrained_overlap_through_ray_on_cuda(ray_cluster, tmp_path):
    """On a GPU (CUDA graphs on, overlap on): constrained requests through the Ray actors give the tokens of one
    step at a time in-process, with and without jump-forward, their steps planned ahead (masks deferred)."""
    from ..gpu.test_gpu_structured import REGEX, make_model, run

    model = make_model(tmp_path)
    ref, _ = run(
        model, "cuda", disable_overlap_schedule=True, disable_jump_forward=True, disable_cuda_graph=True
    )
    for jump in (False, True):
        outs, stats = run(model, "cuda", use_ray=True, disable_jump_forward=not jump)
        same = len(outs) if not jump else 10  # the sampled ones draw fewer numbers when tokens are forced
        assert [o["output_ids"] for o in outs[:same]] == [o["output_ids"] for o in ref[:same]], jump
        assert all(re.fullmatch(REGEX, o["text"]) for o in outs[6:])
        assert stats["num_deferred_mask_steps"] > 0 and stats["num_rebuilds"] == 0
        assert stats["overlap_schedule"]
