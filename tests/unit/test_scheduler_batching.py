"""The real Scheduler over a real ModelRunner: exact step plans for chunked prefill, admission limits and
prefix-cache hits."""

from __future__ import annotations

from .scheduler_harness import (
    POOL,
    Harness,
    make_req,
    prompt,
    rng,
    run_alone,
)

# --- chunked prefill ----------------------------------------------------------------------------------------


def test_chunked_prefill_of_one_prompt(model) -> None:
    ids = prompt(20)
    h = Harness(model, chunked_prefill_size=8)
    h.add(make_req("a", ids, new=3))
    h.run()
    assert h.col("extend_lens") == [[8], [8], [4], [1], [1]]
    assert h.col("prefix_lens") == [[0], [8], [16], [20], [21]]
    assert h.col("sample") == [[False], [False], [True], [True], [True]]
    assert h.col("out_cache_loc") == [rng(1, 9), rng(9, 17), rng(17, 21), [21], [22]]
    out = h.tokens("a")
    assert h.col("input_ids") == [ids[:8], ids[8:16], ids[16:], out[:1], out[1:2]]
    assert [len(p.new_requests) for p in h.plans] == [1, 0, 0, 0, 0]
    new = h.plans[0].new_requests[0]
    assert (new.req_pool_idx, new.output_ids, new.eos_token_ids) == (0, [], [])  # ignore_eos: no EOS sent
    assert [len(o.token_ids) for o in h.outputs["a"]] == [1, 1, 1]  # chunks without sampling emit nothing
    assert h.finish("a") == {"type": "length", "length": 3}
    h.assert_no_leaks()
    assert out == run_alone(model, ids, 3)  # same tokens as one unchunked prefill


def test_chunked_prefill_budget_is_shared_and_decodes_always_run(model) -> None:
    h = Harness(model, chunked_prefill_size=8)
    h.add(make_req("a", prompt(20, 1000), new=4), make_req("b", prompt(20, 2000), new=1))
    h.run()
    # B is admitted with the 4 tokens A's last chunk leaves; from then on A decodes every step (decodes first) and
    # B still gets the whole 8-token prefill budget.
    assert h.rows == [["a"], ["a"], ["a", "b"], ["a", "b"], ["a", "b"], ["a"]]
    assert h.col("extend_lens") == [[8], [8], [4, 4], [1, 8], [1, 8], [1]]
    assert h.col("prefix_lens") == [[0], [8], [16, 0], [20, 4], [21, 12], [22]]
    assert h.col("sample") == [[False], [False], [True, False], [True, False], [True, True], [True]]
    for plan in h.plans:
        prefill = plan.extend_lens[plan.extend_lens > 1].sum()
        assert prefill <= 8
    assert [[n.req_pool_idx for n in p.new_requests] for p in h.plans] == [[0], [], [1], [], [], []]
    assert [p.freed_req_pool_idxs for p in h.plans] == [[], [], [], [], [], [1]]  # B finished in step 5
    assert h.tokens("a") == run_alone(model, prompt(20, 1000), 4)
    assert h.tokens("b") == run_alone(model, prompt(20, 2000), 1)
    h.assert_no_leaks()


def test_without_mixed_chunks_prefill_and_decode_steps_take_turns(model) -> None:
    """``mixed_chunks=False`` (the CUDA default): no step mixes prefill chunks with decodes, so decode steps keep
    the shape CUDA graphs replay; with both kinds of work waiting the steps alternate; tokens are unchanged."""
    h = Harness(model, chunked_prefill_size=8, mixed_chunks=False)
    h.add(make_req("a", prompt(20, 1000), new=4), make_req("b", prompt(20, 2000), new=2))
    h.run()
    kinds = ["prefill" if (p.extend_lens > 1).any() else "decode" for p in h.plans]
    for plan in h.plans:
        assert (plan.extend_lens > 1).all() or (plan.extend_lens == 1).all()
    # A's prompt (8 + 8 + 4 tokens, B's first 4 joining the last chunk), then turns while both kinds wait.
    assert kinds[:3] == ["prefill"] * 3 and kinds[3:5] == ["decode", "prefill"]
    assert h.rows[3] == ["a"] and h.rows[4] == ["b"]
    assert h.tokens("a") == run_alone(model, prompt(20, 1000), 4)
    assert h.tokens("b") == run_alone(model, prompt(20, 2000), 2)
    h.assert_no_leaks()


def test_new_prompt_joins_a_running_decode(model) -> None:
    h = Harness(model, chunked_prefill_size=8)
    h.add(make_req("a", prompt(5, 1000), new=3))
    h.step()
    h.add(make_req("b", prompt(6, 2000), new=1))
    h.run()
    assert h.rows == [["a"], ["a", "b"], ["a"]]
    assert h.col("extend_lens") == [[5], [1, 6], [1]]
    assert h.col("prefix_lens") == [[0], [5, 0], [6]]
    assert h.col("sample") == [[True], [True, True], [True]]
    assert h.plans[1].input_ids.tolist() == h.tokens("a")[:1] + prompt(6, 2000)
    h.assert_no_leaks()


# --- admission limits ---------------------------------------------------------------------------------------


def test_max_prefill_tokens_without_chunking(model) -> None:
    h = Harness(model, chunked_prefill_size=None, max_prefill_tokens=16)
    h.add(
        make_req("a", prompt(10, 1000), 2),
        make_req("b", prompt(10, 2000), 2),
        make_req("c", prompt(6, 3000), 2),
    )
    h.run()
    # Step 1: B (10) would exceed the 6 tokens left, so it waits (and C behind it). Step 2: B takes 10, C exactly 6.
    assert h.rows == [["a"], ["a", "b", "c"], ["b", "c"]]
    assert h.col("extend_lens") == [[10], [1, 10, 6], [1, 1]]
    h.assert_no_leaks()

    # A prompt longer than the budget is still admitted whole into a batch without prefill, and alone.
    h = Harness(model, chunked_prefill_size=None, max_prefill_tokens=16)
    h.add(make_req("c", prompt(20, 1000), 2), make_req("d", prompt(5, 2000), 1))
    h.run()
    assert h.rows == [["c"], ["c", "d"]]
    assert h.col("extend_lens") == [[20], [1, 5]]
    assert h.col("sample") == [[True], [True, True]]
    h.assert_no_leaks()


def test_max_running_requests_caps_the_running_set(model) -> None:
    h = Harness(model, max_running_requests=2)
    reqs = [make_req(rid, prompt(5, 1000 * (i + 1)), new=3) for i, rid in enumerate("abcd")]
    h.add(*reqs)
    while h.sched.has_work:
        h.step()
        assert len(h.sched.running) <= 2
    assert h.rows == [["a", "b"]] * 3 + [["c", "d"]] * 3
    assert [[n.req_pool_idx for n in p.new_requests] for p in h.plans] == [[0, 1], [], [], [2, 3], [], []]
    assert h.plans[3].freed_req_pool_idxs == [0, 1]
    assert all(len(h.tokens(r.rid)) == 3 for r in reqs)
    h.assert_no_leaks()


# --- prefix cache -------------------------------------------------------------------------------------------


def test_prefix_hit_reuses_all_but_the_last_prompt_token(model) -> None:
    ids = prompt(12)
    h = Harness(model)
    h.add(make_req("a", ids, new=2))
    h.run()
    assert h.col("out_cache_loc") == [rng(1, 13), [13]]  # 12 prompt + 1 decode: 13 cached tokens
    assert h.sched.kv.cache.total_size == 13
    h.add(make_req("b", ids, new=2))
    h.run()
    first = h.plans[2]
    assert first.prefix_lens.tolist() == [11] and first.extend_lens.tolist() == [1]
    assert first.sample.tolist() == [True] and first.out_cache_loc.tolist() == [14]
    assert [n.req_pool_idx for n in first.new_requests] == [1]
    assert first.table_req.tolist() == [1] * 11
    assert first.table_pos.tolist() == rng(0, 11)
    assert first.table_slot.tolist() == rng(1, 12)  # A's slots
    assert h.outputs["b"][0].cached_tokens == 11
    assert h.tokens("b") == h.tokens("a")
    h.assert_no_leaks()


def test_prefix_hit_is_rounded_down_to_whole_pages(model) -> None:
    ids = prompt(15)
    h = Harness(model, num_slots=POOL, page_size=4)
    h.add(make_req("a", ids, new=2))
    h.run()
    assert h.col("out_cache_loc") == [rng(4, 19), [19]]  # page 0 (slots 0..3) is reserved
    assert h.sched.kv.cache.total_size == 16
    h.add(make_req("b", ids, new=2))
    h.run()
    first = h.plans[2]
    # 14 prompt tokens may be reused; whole pages of them are 12.
    assert first.prefix_lens.tolist() == [12] and first.extend_lens.tolist() == [3]
    assert first.table_pos.tolist() == rng(0, 12) and first.table_slot.tolist() == rng(4, 16)
    assert first.out_cache_loc.tolist() == [20, 21, 22]  # a fresh page
    assert h.outputs["b"][0].cached_tokens == 12
    assert h.tokens("b") == h.tokens("a")
    h.assert_no_leaks()


def test_no_prefix_hits_with_the_cache_disabled(model) -> None:
    ids = prompt(12)
    h = Harness(model, enable_prefix_cache=False)
    h.add(make_req("a", ids, new=2))
    h.run()
    assert h.sched.kv.allocator.num_free_slots == h.sched.kv.capacity
    h.add(make_req("b", ids, new=2))
    h.run()
    first = h.plans[2]
    assert first.prefix_lens.tolist() == [0] and first.extend_lens.tolist() == [12]
    assert len(first.table_req) == 0
    assert h.outputs["b"][0].cached_tokens == 0
    assert h.tokens("b") == h.tokens("a")
    h.assert_no_leaks()


def test_identical_prompts_prefilled_together_are_deduplicated(model) -> None:
    ids = prompt(10)
    h = Harness(model)
    h.add(make_req("a", ids, new=3), make_req("b", ids, new=3))
    h.run()
    assert h.col("extend_lens")[0] == [10, 10]
    assert h.plans[0].out_cache_loc.tolist() == rng(1, 21)
    # After the step B's copy of the prompt KV is freed and its table row remapped onto A's.
    second = h.plans[1]
    assert second.table_req.tolist() == [1] * 10
    assert second.table_pos.tolist() == rng(0, 10)
    assert second.table_slot.tolist() == rng(1, 11)
    assert second.out_cache_loc.tolist() == [21, 22]
    assert h.tokens("a") == h.tokens("b")
    h.assert_no_leaks()


def test_prompts_sharing_a_long_uncached_prefix_wait_for_the_first(model) -> None:
    shared = prompt(70)
    a, b = shared + prompt(5, base=3000), shared + prompt(6, base=4000)
    h = Harness(model)
    h.add(make_req("a", a, new=2), make_req("b", b, new=2), make_req("c", prompt(40, base=5000), new=2))
    h.run()
    # Step 1: A and the unrelated C are prefilled; B (same first 64 tokens as A) waits for A to cache them.
    assert h.rows[0] == ["a", "c"]
    admitted_b = next(i for i, rows in enumerate(h.rows) if "b" in rows and h.plans[i].new_requests)
    row = h.rows[admitted_b].index("b")
    assert h.plans[admitted_b].prefix_lens.tolist()[row] == 70  # the whole shared prefix came from the cache
    assert h.outputs["b"][0].cached_tokens == 70
    assert h.tokens("b") == run_alone(model, b, 2)
    h.assert_no_leaks()


def test_short_shared_prefixes_do_not_hold_requests_back(model) -> None:
    shared = prompt(20)  # below one 32-token block: not worth waiting for
    h = Harness(model)
    h.add(make_req("a", shared + [7, 8], new=2), make_req("b", shared + [9], new=2))
    h.run()
    assert h.rows[0] == ["a", "b"]
    h.assert_no_leaks()
