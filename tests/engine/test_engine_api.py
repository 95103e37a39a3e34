"""The Engine API: sampling options end to end, logprobs against transformers, streaming, async, n > 1, aborts
and errors (the engine keeps serving after every bad request)."""

from __future__ import annotations

import asyncio
import weakref

import pytest
import torch

import sgl_ray
from sgl_ray.errors import EngineDeadError, InvalidRequestError

from .prompts import PROMPTS

GREEDY = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_qwen2_path):
    with sgl_ray.Engine(tiny_qwen2_path, random_seed=0) as eng:
        yield eng


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with sgl_ray.Engine(smollm2_path) as eng:
        yield eng


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    p = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "seed": 1234, "ignore_eos": True}
    alone = engine.generate(PROMPTS[1], p)
    crowd = engine.generate(PROMPTS[:6], [p if i == 1 else {**p, "seed": i} for i in range(6)])
    assert crowd[1]["output_ids"] == alone["output_ids"]
    other = engine.generate(PROMPTS[1], {**p, "seed": 4321})
    assert other["output_ids"] != alone["output_ids"]
    unseeded = {k: v for k, v in p.items() if k != "seed"}
    a, b = engine.generate([PROMPTS[1]] * 2, unseeded)
    assert a["output_ids"] != b["output_ids"]  # 12 tokens from a ~49k vocab at T=1: equal only by accident


def test_n_samples_share_the_prompt_kv(engine):
    engine.flush_cache()
    ids = engine.tokenizer.encode(PROMPTS[3])
    outs = engine.generate(
        input_ids=ids, sampling_params={"temperature": 1.0, "n": 3, "max_new_tokens": 8, "seed": 7}
    )
    assert len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1  # distinct samples
    cached = sorted(o["meta_info"]["cached_tokens"] for o in outs)
    assert cached == [0, len(ids) - 1, len(ids) - 1]  # the siblings reused the leader's prompt


def test_logprobs_match_transformers(engine, tiny_qwen2_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32).eval()
    ids = engine.tokenizer.encode(PROMPTS[5])
    out = engine.generate(
        input_ids=ids, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0, top_logprobs_num=3
    )
    meta = out["meta_info"]
    full = ids + out["output_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), dim=-1)  # [len, vocab]
    # Output tokens: logprob of each sampled token, top-3 alternatives.
    for i, (lp, tok) in enumerate(meta["output_token_logprobs"]):
        pos = len(ids) - 1 + i
        assert tok == out["output_ids"][i]
        assert lp == pytest.approx(logp[pos, tok].item(), abs=1e-4)
        top_vals, top_ids = logp[pos].topk(3)
        assert [t for _, t in meta["output_top_logprobs"][i]] == top_ids.tolist()
        assert [v for v, _ in meta["output_top_logprobs"][i]] == pytest.approx(top_vals.tolist(), abs=1e-4)
    # Prompt tokens: position 0 has none, then each token under its prefix.
    inp = meta["input_token_logprobs"]
    assert len(inp) == len(ids) and inp[0] == (None, ids[0])
    for p in range(1, len(ids)):
        assert inp[p][1] == ids[p]
        assert inp[p][0] == pytest.approx(logp[p - 1, ids[p]].item(), abs=1e-4)
    # Asking again from a later position still computes those logits despite the cached prompt.
    again = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True, logprob_start_len=3)
    assert [t for _, t in again["meta_info"]["input_token_logprobs"]] == ids[3:]


def test_stop_strings_are_trimmed_across_tokens(smol):
    prompt = "The first five letters of the alphabet are"
    base = smol.generate(prompt, {**GREEDY, "max_new_tokens": 24})
    text = base["text"]
    assert len(text) > 12
    stop = text[5:11]  # six characters, usually spanning a token boundary
    out = smol.generate(prompt, {**GREEDY, "max_new_tokens": 24, "stop": [stop]})
    assert out["text"] == text[: text.index(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = smol.generate(prompt, {**GREEDY, "max_new_tokens": 24, "stop": stop, "no_stop_trim": True})
    assert kept["text"] == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_new_tokens(engine):
    base = engine.generate(PROMPTS[0], GREEDY)
    stop_tok = base["output_ids"][3]
    out = engine.generate(PROMPTS[0], {**GREEDY, "stop_token_ids": [stop_tok]})
    assert out["output_ids"] == base["output_ids"][: base["output_ids"].index(stop_tok) + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    eos = engine.eos_token_ids[0]
    forced = {"temperature": 0.0, "max_new_tokens": 10, "logit_bias": {eos: 100.0}}
    assert engine.generate(PROMPTS[0], forced)["output_ids"] == [eos]
    delayed = engine.generate(PROMPTS[0], {**forced, "min_new_tokens": 4})
    assert len(delayed["output_ids"]) == 5 and delayed["output_ids"][-1] == eos
    assert eos not in delayed["output_ids"][:4]


def test_max_new_tokens_zero_and_length_finish(engine):
    out = engine.generate(PROMPTS[2], {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    out = engine.generate(PROMPTS[2], GREEDY)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 10}


def test_streaming_equals_blocking(smol):
    blocking = smol.generate(PROMPTS[3], {**GREEDY, "max_new_tokens": 16})
    chunks = list(smol.generate(PROMPTS[3], {**GREEDY, "max_new_tokens": 16}, stream=True))
    assert "".join(c["text"] for c in chunks) == blocking["text"]
    assert [t for c in chunks for t in c["output_ids"]] == blocking["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == blocking["meta_info"]["finish_reason"]


def test_async_generate_and_stream(engine):
    async def main():
        single = await engine.async_generate(PROMPTS[1], GREEDY)
        many = await asyncio.gather(*(engine.async_generate(p, GREEDY) for p in PROMPTS[:4]))
        stream = await engine.async_generate(PROMPTS[1], GREEDY, stream=True)
        chunks = [c async for c in stream]
        return single, many, chunks

    single, many, chunks = asyncio.run(main())
    assert many[1]["output_ids"] == single["output_ids"]
    assert [t for c in chunks for t in c["output_ids"]] == single["output_ids"]


def test_abandoned_stream_is_aborted_and_engine_keeps_serving(engine):
    stream = engine.generate(PROMPTS[4], {**GREEDY, "max_new_tokens": 200}, stream=True)
    next(stream)
    stream.close()  # the caller walks away: the request is aborted and its KV freed
    assert engine.generate(PROMPTS[4], GREEDY)["meta_info"]["completion_tokens"] == 10
    stats = engine.get_stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
        ({"prompt": "hi", "sampling_params": {"top_p": 0}}, "top_p"),
        ({"prompt": "hi", "sampling_params": {"max_new_tokens": -3}}, "max_new_tokens"),
        ({"prompt": "hi", "sampling_params": {"n": 0}}, "n"),
        ({"prompt": "hi", "sampling_params": {"stop": [""]}}, "stop"),
        ({"prompt": "hi", "sampling_params": {"temperature": "hot"}}, "sampling_params"),
        ({"input_ids": [1, 2, 10**9]}, "input_ids"),
        ({"input_ids": list(range(100, 9000))}, "prompt"),
        ({"prompt": "hi", "input_ids": [1]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "lora_path": 5}, "lora_path"),
        ({"prompt": ["a", "b"], "lora_path": {"x": 1, "y": 2}}, "lora_path"),
        ({"prompt": ["a", "b"], "sampling_params": [GREEDY]}, "sampling_params"),
        ({"prompt": "hi", "priority": 2**70}, "priority"),
        ({"input_ids": [[1, 2], []]}, "input_ids"),
    ],
)
def test_bad_requests_raise_typed_errors(engine, kwargs, param):
    with pytest.raises(InvalidRequestError) as exc:
        engine.generate(**kwargs)
    assert exc.value.param == param
    assert exc.value.status_code == 400
    assert engine.generate("still serving", GREEDY)["meta_info"]["completion_tokens"] == 10


def test_flush_cache(engine):
    ids = engine.tokenizer.encode(PROMPTS[6])
    engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert engine.generate(input_ids=ids, sampling_params=GREEDY)["meta_info"]["cached_tokens"] > 0
    assert engine.flush_cache() is True
    assert engine.generate(input_ids=ids, sampling_params=GREEDY)["meta_info"]["cached_tokens"] == 0


def test_shutdown_fails_new_requests(tiny_qwen3_path):
    eng = sgl_ray.Engine(tiny_qwen3_path)
    assert eng.generate("x", GREEDY)["meta_info"]["completion_tokens"] == 10
    runner = weakref.ref(eng._core.runner)
    eng.shutdown()
    assert runner() is None  # weights, KV pool and graphs are released with the runner
    with pytest.raises(EngineDeadError):
        eng.generate("x", GREEDY)


def test_alternating_prefill_and_decode_steps_give_the_same_tokens(tiny_llama_path):
    """``enable_mixed_chunk=False`` (the CUDA default) under overlap scheduling: the same greedy tokens as mixed
    steps, with staggered prompt lengths so chunks and decodes compete."""
    prompts = [list(range(100 + i, 112 + 7 * i)) for i in range(8)]
    params = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    runs = []
    for mixed in (True, False):
        with sgl_ray.Engine(
            tiny_llama_path, enable_mixed_chunk=mixed, chunked_prefill_size=16, max_total_tokens=4096
        ) as eng:
            runs.append([o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=params)])
    assert runs[0] == runs[1] and all(len(r) == 12 for r in runs[0])
