"""NGRAM draft trees (``speculative_ngram_*_bfs_breadth``, ``_match_type``, ``_branch_length``, ``_capacity``): the
n-gram cache on hand-made histories (what goes in, the BFS breadth rule, PROB's order, dropping the least recent
n-grams), the trees the scheduler proposes, and engines whose NGRAM trees give greedy and seeded outputs identical
to decoding without speculation, under a grammar too, with the KV pool back where it started."""

from __future__ import annotations

import random

import numpy as np
import pytest

import sgl_ray
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.request import Req
from sgl_ray.scheduler.speculation import Speculation
from sgl_ray.speculative import SpeculativeConfig
from sgl_ray.speculative.ngram_cache import NgramCache

from .test_spec_engine import assert_pool_restored, constrained_params


def _cache(**kw) -> NgramCache:
    opts = dict(capacity=10_000, branch_length=6, min_window=1, max_window=3, min_breadth=1, max_breadth=4)
    return NgramCache(**{**opts, **kw})


def _dump(cache: NgramCache) -> dict[tuple[int, ...], int]:
    """Every n-gram in the cache and its count."""
    out, stack = {}, [((), 0)]
    while stack:
        path, node = stack.pop()
        for token, _, count, child in cache._kids(node):
            out[(*path, token)] = count
            stack.append(((*path, token), child))
    return out


def test_extending_in_pieces_records_every_ngram_once():
    tokens = [1, 2, 3, 1, 2, 4, 1, 2, 3, 5]
    whole, pieces = _cache(), _cache()
    whole.extend([], tokens)
    cursors = []
    for a, b in ((0, 3), (3, 4), (4, 10)):
        cursors = pieces.extend(cursors, tokens[a:b])
    assert _dump(whole) == _dump(pieces)
    grams = _dump(whole)
    assert grams[(1, 2)] == 3 and grams[(1, 2, 3)] == 2 and grams[(2, 4, 1, 2, 3, 5)] == 1
    assert all(len(g) <= 6 for g in grams)  # branch_length
    assert whole.num_nodes == len(grams)


def test_bfs_tree_prefers_recent_continuations_and_narrows_with_longer_matches():
    cache = _cache()
    history = [7, 1, 2, 3, 9, 1, 2, 4, 9, 1, 2, 5, 9, 1, 2]
    cache.extend([], history)
    # a request ending "9 1 2" with no earlier text of its own: the cache's anchors are "9 1 2" (w=3: breadth 1),
    # "1 2" (w=2: breadth 1.75 -> 1) and "2" (w=1: breadth 2.5 -> 2)
    suffix = np.array([9, 1, 2])
    nodes, parents = cache.draft_tree(suffix, max_nodes=6, max_depth=3)
    assert nodes[:3] == [5, 9, 1] and parents[:3] == [0, 1, 2]  # the longest match: its latest continuation
    assert all(p < i + 1 for i, p in enumerate(parents))  # parents first
    assert len(nodes) == 6 and set(nodes[3:]) <= {3, 4, 9, 1, 2}
    assert len(set(zip(parents, nodes, strict=True))) == len(nodes)  # a node's children are distinct tokens
    depth = [0]
    for p in parents:
        depth.append(depth[p] + 1)
    assert max(depth) <= 3
    # the request's own text counts first: its one earlier "1 2" was followed by 8
    # (a match of 3 the cache has comes before a match of 2 the request has: here "1 2" only)
    own = np.array([1, 2, 8, 6, 0, 1, 2])
    nodes, parents = cache.draft_tree(own, max_nodes=2, max_depth=3)
    assert (nodes, parents) == ([8, 6], [0, 1])


def test_short_matches_branch_wide():
    """Only the last token matches (w=1, breadth min + (max_window - 1) * s = 2.5 -> 2): two children of the root,
    the two most recent continuations of the request's own earlier occurrences."""
    cache = _cache()
    tokens = np.array([4, 10, 4, 11, 4, 12, 3, 4])
    nodes, parents = cache.draft_tree(tokens, max_nodes=2, max_depth=1)
    assert (nodes, parents) == ([12, 11], [0, 0])


def test_prob_tree_follows_the_most_frequent_continuations():
    cache = _cache(match_type="PROB", max_breadth=2)
    cache.extend([], [1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 4, 0])
    nodes, parents = cache.draft_tree(np.array([8, 1, 2]), max_nodes=3, max_depth=3)
    # "1 2 -> 3" twice, "-> 4" once: 3 (2/3), then "3 -> 0" (2/3), then "0 -> 1" (2/3) before 4 (1/3)
    assert (nodes, parents) == ([3, 0, 1], [0, 1, 2])


def test_capacity_drops_the_least_recent_ngrams():
    cache = _cache(capacity=60)
    rng = random.Random(0)
    old = [rng.randrange(100, 200) for _ in range(40)]
    cursors = cache.extend([], old)
    assert cache.num_nodes <= 60 and cache.epoch == 1
    recent = [rng.randrange(300, 400) for _ in range(6)]
    cache.extend([], old[-5:] + recent)  # cursors of an earlier epoch are walked again from the tail
    assert cache.num_nodes <= 60
    grams = _dump(cache)
    assert len(grams) == cache.num_nodes == len(cache._child)  # every node reachable, no orphan
    assert (
        tuple(recent[-3:]) in grams and (recent[-1],) in grams
    )  # the n-grams ending at the newest token stay
    assert (old[0], old[1]) not in grams  # the oldest went
    assert cursors  # (they named nodes of the first epoch)


def test_the_scheduler_walks_a_request_again_after_an_eviction():
    """A request's cursors from before an eviction are not reused (their ids may be dropped or reused): its next
    tokens still extend the n-grams that end at its newest token."""
    cfg = SpeculativeConfig.from_args(
        EngineArgs(
            speculative_algorithm="NGRAM",
            speculative_ngram_capacity=40,
            speculative_ngram_branch_length=13,
        )
    )
    spec = Speculation(cfg, context_length=4096, grammars=None)
    rng = random.Random(3)
    r = Req("r", prompt_ids=[1, 2], sampling=SamplingParams(max_new_tokens=512), seed=0)
    for _ in range(30):
        r.output_ids.extend(rng.randrange(100, 120) for _ in range(3))
        spec.propose(r)
        grams = _dump(spec.ngram)
        assert len(grams) == spec.ngram.num_nodes <= 40
        tail = tuple(([1, 2] + r.output_ids)[-3:])
        assert tail in grams  # the newest n-grams are in
    assert spec.ngram.epoch > 3


@pytest.mark.parametrize("regrown", [2, 3])
def test_tokens_taken_back_and_grown_again_are_walked_again(regrown):
    """Jump-forward tokens rejected and as many (or more) other tokens grown before the next proposal: the
    request's cursors ended in the old tokens, so the cache walks it again from before the change; the new
    tokens extend the n-grams of what precedes them, and nothing continues the taken-back tokens."""
    cfg = SpeculativeConfig.from_args(
        EngineArgs(
            speculative_algorithm="NGRAM",
            speculative_ngram_branch_length=4,
            speculative_ngram_max_match_window_size=3,
        )
    )
    spec = Speculation(cfg, context_length=4096, grammars=None)
    r = Req("r", prompt_ids=[1, 2], sampling=SamplingParams(max_new_tokens=64), seed=0)
    r.output_ids = [10, 11, 12, 13]
    spec.propose(r)
    del r.output_ids[-2:]  # 12 13 taken back
    r.output_ids += [20, 21, 22][:regrown]
    spec.propose(r)
    grams = _dump(spec.ngram)
    assert (10, 11, 20, 21) in grams and (11, 20, 21) in grams
    assert not any(g[:2] in ((12, 20), (13, 20)) or g[:3] == (11, 12, 20) for g in grams)
    r.output_ids.append(30)  # cursors again valid: the next token goes on the new path
    spec.propose(r)
    assert tuple(r.output_ids[-3:]) in _dump(spec.ngram)


def test_scheduler_proposes_trees_from_other_requests_outputs():
    """Two requests' outputs go into the engine's cache; a third whose text ends like theirs, with no earlier
    occurrence of its own, gets a tree with both continuations (the most recent first)."""
    cfg = SpeculativeConfig.from_args(
        EngineArgs(speculative_algorithm="NGRAM", speculative_num_draft_tokens=5)
    )
    spec = Speculation(cfg, context_length=1024, grammars=None)

    def req(rid: str, prompt: list[int], output: list[int]) -> Req:
        r = Req(rid, prompt_ids=prompt, sampling=SamplingParams(max_new_tokens=64), seed=0)
        r.output_ids = list(output)
        return r

    for r in (req("a", [50, 51], [10, 11, 12, 13]), req("b", [60, 61], [10, 11, 14, 15])):
        spec.propose(r)
    drafts, masks, parents = spec.propose(req("c", [70, 10, 11], []))
    assert masks is None
    assert (drafts, parents) == ([14, 12, 15, 13], [0, 0, 1, 2])


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(rng.randrange(6, 24))] for _ in range(n)]


@pytest.fixture(scope="module")
def plain(ngram_target):
    with sgl_ray.Engine(ngram_target, max_total_tokens=4096) as engine:
        yield engine


@pytest.mark.parametrize("match_type", ["BFS", "PROB"])
def test_ngram_trees_are_token_exact(plain, ngram_target, match_type):
    """Prompts that repeat their own greedy continuation (so drafts hold), greedy and seeded, and constrained
    requests: outputs equal decoding without speculation; most steps keep drafts."""
    new = 16
    greedy = {"temperature": 0.0, "max_new_tokens": new, "ignore_eos": True}
    base = _prompts(4, seed=1)
    first = plain.generate(input_ids=base, sampling_params=greedy)
    prompts = [p + o["output_ids"] + p for p, o in zip(base, first, strict=True)]
    sampled = {**greedy, "temperature": 0.8, "seed": 7}
    want = plain.generate(input_ids=prompts, sampling_params=greedy)
    want_sampled = plain.generate(input_ids=prompts, sampling_params=sampled)
    want_constrained = plain.generate(input_ids=base, sampling_params=constrained_params(new))
    with sgl_ray.Engine(
        ngram_target,
        max_total_tokens=4096,
        speculative_algorithm="NGRAM",
        speculative_num_draft_tokens=6,
        speculative_ngram_match_type=match_type,
    ) as engine:
        got = engine.generate(input_ids=prompts, sampling_params=greedy)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        metas = [o["meta_info"] for o in got]
        assert (
            sum(m["spec_accepted_drafts"] for m in metas) > sum(m["spec_proposed_drafts"] for m in metas) // 2
        )
        got = engine.generate(input_ids=prompts, sampling_params=sampled)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want_sampled]
        constrained = engine.generate(input_ids=base, sampling_params=constrained_params(new))
        assert [o["output_ids"] for o in constrained] == [o["output_ids"] for o in want_constrained]
        assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in constrained)
        assert sum(o["meta_info"]["spec_proposed_drafts"] for o in constrained) > 0
        assert_pool_restored(engine)


def test_a_later_branch_is_accepted(plain, ngram_target):
    """After the prefill's token the request's last three tokens occurred twice before: first followed by what the
    target continues with, then by something else. A chain follows the most recent occurrence and loses; the tree has both continuations as
    children of its root, and the target's path through the second child is kept (its KV moved to the chunk's
    first rows): outputs identical, and the tree needs one verify step where the chain needs more."""
    greedy = {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True}
    rng = random.Random(6)
    head, other = (
        [rng.randrange(1000, 40000) for _ in range(5)],
        [rng.randrange(1000, 40000) for _ in range(4)],
    )
    p, a = 41000, 41001

    def prompt(follow: list[int]) -> list[int]:  # the prefill gives follow[0]; verify steps start after it
        return head + [p, a] + follow + [42000, p, a, follow[0]] + other + [43000, p, a]

    follow = [rng.randrange(1000, 40000) for _ in range(4)]
    for _ in range(8):  # the continuation the target gives after the prompt that holds it: a fixed point
        nxt = plain.generate(input_ids=prompt(follow), sampling_params=greedy)["output_ids"]
        if nxt == follow:
            break
        follow = nxt
    else:
        pytest.fail("no prompt holds the target's own continuation")
    assert follow[1] != other[0]
    accepted = {}
    for breadth in (1, 10):
        with sgl_ray.Engine(
            ngram_target,
            max_total_tokens=4096,
            speculative_algorithm="NGRAM",
            speculative_num_draft_tokens=6,
            speculative_ngram_max_bfs_breadth=breadth,
        ) as engine:
            got = engine.generate(input_ids=prompt(follow), sampling_params=greedy)
            assert got["output_ids"] == follow
            meta = got["meta_info"]
            accepted[breadth] = (meta["spec_verify_ct"], meta["spec_accepted_drafts"])
            assert_pool_restored(engine)
    # the tree: one verify step emits the 3 tokens after the prefill's (2 drafts kept); the chain loses a step
    assert accepted[10] == (1, 2) and accepted[1][0] > 1


def test_trees_stay_inside_the_context(ngram_target):
    """Near the end of the context a tree is no wider than the positions left (its chunk has a row per node) and
    no deeper than a chain could go; outputs still equal decoding without speculation up to the context's end."""
    cfg = SpeculativeConfig.from_args(EngineArgs(speculative_algorithm="NGRAM"))
    spec = Speculation(cfg, context_length=40, grammars=None)
    r = Req("r", prompt_ids=[5, 6, 7, 8, 5, 6, 9, 8, 5, 6, 7] * 3 + [5], sampling=SamplingParams(), seed=0)
    drafts, _, parents = spec.propose(r)  # 34 tokens: rows for at most 40 - 34 - 1 = 5 nodes
    assert 0 < len(drafts) <= 5 and max(parents) < len(drafts)
    base = _prompts(1, seed=11)[0][:8]
    greedy = {"temperature": 0.0, "max_new_tokens": 64, "ignore_eos": True}
    outs = {}
    for spec_opts in ({}, {"speculative_algorithm": "NGRAM"}):
        with sgl_ray.Engine(ngram_target, context_length=48, max_total_tokens=512, **spec_opts) as engine:
            if not spec_opts:  # a prompt that repeats its own continuation, so that drafts hold
                cont = engine.generate(input_ids=base, sampling_params={**greedy, "max_new_tokens": 8})
                prompt = base + cont["output_ids"] + base
            outs[bool(spec_opts)] = engine.generate(input_ids=prompt, sampling_params=greedy)
    assert outs[True]["output_ids"] == outs[False]["output_ids"]
    assert len(prompt) + len(outs[True]["output_ids"]) == 48  # to the context's end
    assert outs[True]["meta_info"]["spec_accepted_drafts"] > 0
