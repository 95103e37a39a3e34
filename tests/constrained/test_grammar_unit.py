"""Grammar backend, bitmask application, KV rollback and protocol mapping, without running a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xgrammar as xgr

from sgl_ray import protocol as P
from sgl_ray.constrained.base import GrammarSpec, bitmask_width
from sgl_ray.constrained.manager import GrammarManager
from sgl_ray.errors import InvalidRequestError
from sgl_ray.model_loader import load_tokenizer, resolve_model
from sgl_ray.sampling.bitmask import apply_token_bitmask_, unpack_bitmask
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.sampling.sampler import Sampler
from sgl_ray.sampling.state import SamplingState
from sgl_ray.scheduler.kv_manager import KVCacheManager
from sgl_ray.scheduler.request import Req


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_tokenizer(resolve_model(smollm2_path))


@pytest.fixture(scope="module")
def manager(tokenizer):
    mgr = GrammarManager(
        "xgrammar", tokenizer, vocab_size=len(tokenizer), stop_token_ids=(tokenizer.eos_token_id,)
    )
    yield mgr
    mgr.shutdown()


def test_bitmask_matches_xgrammar_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, bitmask_width(vocab)), dtype=torch.int32, generator=gen)
    logits = torch.randn(3, vocab, generator=gen)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, backend="torch_native")
    ours = apply_token_bitmask_(logits.clone(), bitmask)  # numpy's unpackbits (CPU)
    torch.testing.assert_close(ours, expected)
    allowed = unpack_bitmask(bitmask, vocab)  # the plain torch path (GPU)
    assert torch.equal(allowed, torch.isfinite(expected))
    torch.testing.assert_close(logits.clone().masked_fill_(~allowed, float("-inf")), expected)


def test_sampler_applies_the_mask_before_greedy_and_sampling() -> None:
    vocab = 64
    st = SamplingState(max_reqs=2, vocab_size=vocab)
    st.set_request(0, SamplingParams(temperature=0.0), seed=0, eos_token_ids=[], prompt_ids=[1])
    st.set_request(1, SamplingParams(temperature=1.0, top_p=0.9), seed=3, eos_token_ids=[], prompt_ids=[1])
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))
    allowed = [{5, 40}, {7, 8, 9}]
    mask = np.zeros((2, bitmask_width(vocab)), dtype=np.int32)
    for row, toks in enumerate(allowed):
        for t in toks:
            mask[row, t // 32] |= np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(-(2**31))
    out = Sampler().sample(
        logits, torch.tensor([0, 1]), torch.tensor([3, 3]), st, vocab_mask=torch.from_numpy(mask)
    )
    ids = out.next_token_ids.tolist()
    assert ids[0] == max(allowed[0], key=lambda t: logits[0, t].item())
    assert ids[1] in allowed[1]
    # log-probs stay those of the raw distribution
    expected = torch.log_softmax(logits, -1).gather(1, out.next_token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)


def test_manager_caches_compiles_and_matches(manager, tokenizer) -> None:
    spec = GrammarSpec("regex", r"abc[0-9]{2}")
    fut = manager.compile(spec)
    assert manager.compile(spec) is fut  # one compile per distinct spec
    m = manager.matcher(fut.result(timeout=60))
    assert m.find_jump_forward_string() == "abc"
    ids = tokenizer.encode("abc42", add_special_tokens=False)
    assert all(m.accept_token(t) for t in ids)
    m.rollback(1)
    assert m.accept_token(ids[-1])
    assert not m.is_terminated()
    assert m.accept_token(tokenizer.eos_token_id) and m.is_terminated()
    mask = np.zeros(bitmask_width(len(tokenizer)), dtype=np.int32)
    m2 = manager.matcher(fut.result())
    m2.fill_next_token_bitmask(mask)
    allowed = unpack_bitmask(torch.from_numpy(mask)[None], len(tokenizer))[0].nonzero().flatten().tolist()
    assert allowed and all("abc".startswith(tokenizer.decode([t])) for t in allowed)


@pytest.mark.parametrize("row_cost_s", [0.0, 1e-3])  # cheap rows: one thread; costly rows: several
def test_batched_mask_fill_equals_one_by_one(manager, tokenizer, row_cost_s) -> None:
    """The batch fill (xgrammar's threads, from 8 rows up) writes each matcher's own mask into its row, on one
    thread or several."""
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}})
    compiled = [manager.compile(GrammarSpec(k, v)).result(timeout=60) for k, v in
                [("json_schema", schema), ("regex", r"[a-c]+x"), ("json_object", "")]]  # fmt: skip
    text = '{"n": 12, "s": "ab'
    matchers = []
    for i in range(12):  # different grammars and states
        m = manager.matcher(compiled[i % 3])
        prefix = {0: text[: i + 1], 1: "abc"[: i % 4], 2: "{"}[i % 3]
        for ch in prefix:  # one character per token: no merges the compact JSON grammar would not produce
            (t,) = tokenizer.encode(ch, add_special_tokens=False)
            assert m.accept_token(t), (i, prefix)
        matchers.append(m)
    width = bitmask_width(len(tokenizer))
    rows = [2 * i + 1 for i in range(len(matchers))]  # every other row, as rows of a batch with verify rows
    batched = np.full((2 * len(matchers) + 1, width), -1, dtype=np.int32)
    fills = manager._backend_future.result()._fills
    fills.max_threads, fills.row_s = 4, row_cost_s
    manager.fill_bitmasks(matchers, batched, rows)
    assert (fills.last_threads > 1) == (row_cost_s > 0)
    for m, row in zip(matchers, rows, strict=True):
        one = np.zeros(width, dtype=np.int32)
        m.fill_next_token_bitmask(one)
        assert np.array_equal(batched[row], one)
        assert (batched[row - 1] == -1).all()  # rows not asked for stay as they were
    assert len({batched[r].tobytes() for r in rows}) > 3
    assert fills.row_s > 0  # the next batch's thread count follows the measured cost


def test_fill_thread_count_follows_row_cost() -> None:
    from sgl_ray.constrained.xgrammar_backend import _BatchFills

    fills = _BatchFills(max_threads=15)
    assert fills.threads_for(128) == 1  # nothing measured yet
    fills.row_s = 1.5e-6  # easy states: 0.2 ms for 128 rows, threads cost more than they save
    assert fills.threads_for(128) == 1
    fills.row_s = 1e-3  # inside maxLength strings
    assert fills.threads_for(128) == 15 and 1 < fills.threads_for(8) < 15


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (GrammarSpec("json_schema", "[1, 2"), "not valid JSON"),
        (GrammarSpec("json_schema", "3"), "object or a boolean"),
        (GrammarSpec("regex", "(("), "regex"),
        (GrammarSpec("ebnf", "root ::= ("), "ebnf"),
    ],
)
def test_bad_grammars_fail_with_invalid_request_error(manager, spec, words) -> None:
    with pytest.raises(InvalidRequestError) as err:
        manager.compile(spec).result(timeout=60)
    assert err.value.param == spec.kind and words in str(err.value)


def test_sampling_params_grammar_fields() -> None:
    p = SamplingParams(json_schema={"type": "object"}).normalized()
    assert p.json_schema == '{"type": "object"}' and p.grammar == ("json_schema", '{"type": "object"}')
    assert SamplingParams(regex="a+").grammar == ("regex", "a+")
    assert SamplingParams().grammar is None
    with pytest.raises(InvalidRequestError, match="only one"):
        SamplingParams(regex="a", json_schema="{}").normalized()


def _chat(**extra) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}).encode()


def test_response_format_maps_to_grammars() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [
        ({"response_format": {"type": "json_object"}}, ("json_schema", P.structured.JSON_OBJECT_SCHEMA)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema, "strict": True},
                }
            },
            ("json_schema", json.dumps(schema)),
        ),
        ({"response_format": {"type": "text"}}, None),
        ({"regex": "[0-9]+"}, ("regex", "[0-9]+")),
        ({"ebnf": 'root ::= "a"'}, ("ebnf", 'root ::= "a"')),
        ({"json_schema": schema}, ("json_schema", json.dumps(schema))),
    ]
    for extra, grammar in cases:
        req = P.decode_request("chat", _chat(**extra))
        assert P.to_sampling_params(req, vocab_size=100, context_length=64, prompt_len=4).grammar == grammar
    comp = P.decode_request("completion", json.dumps({"prompt": "x", "regex": "a|b"}).encode())
    assert P.to_sampling_params(comp, vocab_size=100, context_length=64, prompt_len=1).regex == "a|b"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "regex": "a"}, "regex"),
        ({"response_format": {"type": "xml"}}, None),
    ],
)
def test_bad_response_formats(extra, param) -> None:
    with pytest.raises(InvalidRequestError) as err:
        req = P.decode_request("chat", _chat(**extra))
        P.to_sampling_params(req, vocab_size=100, context_length=64, prompt_len=4)
    if param is not None:
        assert err.value.param == param


def test_kv_truncate_frees_whole_pages_past_the_kept_tokens() -> None:
    kv = KVCacheManager(num_slots=64, page_size=4, max_reqs=2, enable_prefix_cache=False)
    req = Req("r", prompt_ids=list(range(6)), sampling=SamplingParams(), seed=0)
    assert kv.admit(req, None, 6)
    assert kv.alloc([req], [7]) is not None  # 13 tokens: 4 pages
    free_before = kv.allocator.num_free_slots
    req.num_computed = 13
    kv.truncate(req, 7)  # tokens 7..12 rejected: pages 2 and 3 (tokens 8..15) go back
    assert len(req.kv_slots) == 7 and req.num_computed == 7
    assert kv.allocator.num_free_slots == free_before + 8
    slots = kv.alloc([req], [2])  # refills the rest of page 1, then a new page
    assert slots is not None and slots[0] == req.kv_slots.view()[6] + 1


@pytest.mark.gpu
def test_bitmask_and_masked_sampling_on_gpu_match_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(2)
    vocab = 49152
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, bitmask_width(vocab)), dtype=torch.int32, generator=gen)
    logits = torch.randn(4, vocab, generator=gen)
    cpu = apply_token_bitmask_(logits.clone(), bitmask)
    gpu = apply_token_bitmask_(logits.cuda(), bitmask.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu)
    st = SamplingState(max_reqs=4, vocab_size=vocab, device="cuda")
    for slot in range(4):
        st.set_request(slot, SamplingParams(temperature=0.0), seed=slot, eos_token_ids=[], prompt_ids=[1])
    out = Sampler().sample(logits.cuda(), torch.arange(4), torch.full((4,), 5), st, vocab_mask=bitmask.cuda())
    assert out.next_token_ids.cpu().tolist() == cpu.argmax(-1).tolist()


def test_verify_masks_of_a_draft_tree(tokenizer) -> None:
    """The masks of a verify chunk built from a drafter's tree: each row's is the grammar's after the path to it
    (checked against a matcher fed that path), a row under a node the grammar rejects allows everything, and the
    request's matcher is left as it was."""
    from sgl_ray.scheduler.grammar import GrammarTracker

    tracker = GrammarTracker(tokenizer, vocab_size=len(tokenizer))
    params = SamplingParams(regex="(yes|no|maybe)( (yes|no|maybe))*")
    req = Req("r", prompt_ids=[1, 2], sampling=params, seed=0, eos_token_ids=(tokenizer.eos_token_id,))
    tracker.start(req)
    req.grammar_compile.result()
    assert tracker.ready(req)
    ids = {w: tokenizer.encode(w, add_special_tokens=False) for w in ("yes", " no", " maybe", "#")}
    assert all(len(v) == 1 for v in ids.values())
    yes, no, maybe, bad = (ids[w][0] for w in ("yes", " no", " maybe", "#"))
    # rows: 0 root; 1 yes, 2 '#' (rejected), 3 yes>no, 4 yes>maybe, 5 '#'>yes (unreachable), 6 yes>no>maybe
    tokens = np.array([yes, bad, no, maybe, yes, maybe])
    parents = np.array([0, 0, 1, 1, 2, 3])
    before = np.zeros((1, tracker.width), dtype=np.int32)
    tracker._manager.fill_bitmasks([req.grammar], before, [0])
    masks = tracker.verify_masks(req, tokens, parents)

    def after(path: list[int]) -> np.ndarray:
        m = tracker._manager.matcher(req.grammar_compile.result())
        assert all(m.accept_token(t) for t in path)
        out = np.zeros((1, tracker.width), dtype=np.int32)
        tracker._manager.fill_bitmasks([m], out, [0])
        return out[0]

    assert np.array_equal(masks[0], before[0])
    for row, path in {1: [yes], 3: [yes, no], 4: [yes, maybe], 6: [yes, no, maybe]}.items():
        assert np.array_equal(masks[row], after(path)), row
    assert (masks[[2, 5]] == -1).all()  # never emitted: their parents' masks rule them out
    assert not np.array_equal(masks[1], masks[0])
    again = np.zeros((1, tracker.width), dtype=np.int32)
    tracker._manager.fill_bitmasks([req.grammar], again, [0])
    assert np.array_equal(again, before)  # the matcher is where it was
    chain = tracker.verify_masks(req, np.array([yes, no, bad, maybe]))  # a chain: each node after the last
    assert np.array_equal(chain[:3], masks[[0, 1, 3]]) and (chain[3:] == -1).all()
    tracker.shutdown()
