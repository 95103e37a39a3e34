"""Tree drafts (``speculative_eagle_topk`` > 1): the tree search and walk on hand-made cases (the tree attention mask
is checked in tests/unit/test_tree_mask.py), and greedy (and seeded) outputs of STANDALONE and EAGLE trees token-identical to decoding without
speculation on tiny random models — concurrent batches, prefill chunks of 8 tokens with preemption — with the KV
pool back where it started."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import sgl_ray
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.errors import InvalidRequestError, UnsupportedFeatureError
from sgl_ray.speculative.config import SpeculativeConfig
from sgl_ray.speculative.tree import DraftTree, accept_tree, ancestor_masks, search_tree

from .eagle_heads import copy_head_of, copy_target, save_eagle_head
from .test_spec_engine import assert_pool_restored

NEW = 20
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}


def test_search_and_walk():
    """A 3-token vocabulary, topk 2, 3 steps: the kept nodes are the best by cumulative log-prob, parents first;
    the walk follows the target's tokens while a child matches."""
    root = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    nxt = torch.log(torch.tensor([0.1, 0.2, 0.7]))  # every node's children: token 2, then 1

    def expand(depth, tokens, origin):
        return nxt.expand(1, tokens.shape[1], 3)

    tree = search_tree(root, expand, topk=2, num_steps=3, sizes=np.array([5]))
    # candidates: d1 {0: .6, 1: .3}; d2 {0>2: .42, 0>1: .12, 1>2: .21, 1>1: .06}; d3 from (0>2, 1>2)
    # {0>2>2: .294, 0>2>1: .084, 1>2>2: .147, ...}: best five .6 .42 .3 .294 .21
    assert tree.tokens.tolist() == [[0, 2, 1, 2, 2]]
    assert tree.parents.tolist() == [[0, 1, 0, 2, 3]]
    assert tree.depths.tolist() == [[0, 1, 2, 1, 3, 2]]
    masks = ancestor_masks(tree)[0]
    assert masks[4].nonzero().flatten().tolist() == [0, 1, 2, 4]  # node 4: root, 1, 2 and itself
    assert masks[5].nonzero().flatten().tolist() == [0, 3, 5]
    # target tokens per chunk row: root says 1 (row 3), row 3 says 2 (row 5), row 5 says 0 (no child): m = 2
    walk = accept_tree(torch.tensor([[1, 9, 9, 2, 9, 0]]), tree)
    assert walk.accepted.tolist() == [2]
    assert walk.path[0, :3].tolist() == [0, 3, 5] and walk.tokens[0, :3].tolist() == [1, 2, 0]
    walk = accept_tree(torch.tensor([[2, 9, 9, 2, 9, 0]]), DraftTree(*tree))  # no child of the root is 2
    assert walk.accepted.tolist() == [0] and walk.tokens[0, 0].item() == 2


def test_tree_options():
    draft = dict(speculative_algorithm="EAGLE", speculative_draft_model_path="/h", speculative_eagle_topk=4)
    cfg = SpeculativeConfig.from_args(EngineArgs(**draft, speculative_num_steps=3))
    assert (cfg.topk, cfg.num_steps, cfg.num_draft_tokens, cfg.is_tree) == (4, 3, 13, True)
    cfg = SpeculativeConfig.from_args(
        EngineArgs(**draft, speculative_num_steps=5, speculative_num_draft_tokens=8)
    )
    assert (cfg.num_draft_tokens, cfg.max_drafts) == (8, 7)
    with pytest.raises(InvalidRequestError) as e:  # 2 + 2 * 4 = 10 nodes at most
        SpeculativeConfig.from_args(
            EngineArgs(
                **{**draft, "speculative_eagle_topk": 2},
                speculative_num_steps=3,
                speculative_num_draft_tokens=12,
            )
        )
    assert e.value.param == "speculative_num_draft_tokens"
    for bad in (
        {"attention_backend": "flashinfer"},
        {"speculative_algorithm": "NGRAM", "speculative_draft_model_path": None},
    ):
        with pytest.raises(UnsupportedFeatureError) as e:
            SpeculativeConfig.from_args(EngineArgs(**{**draft, **bad}))
        assert e.value.param == "speculative_eagle_topk"


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(rng.randrange(4, 50))] for _ in range(n)]


@pytest.fixture(scope="module")
def plain(tiny_llama_path):
    with sgl_ray.Engine(tiny_llama_path, max_total_tokens=4096) as engine:
        yield engine


def _counts(outs: list[dict]) -> tuple[int, int, int]:
    metas = [o["meta_info"] for o in outs]
    return tuple(
        sum(m[k] for m in metas) for k in ("spec_verify_ct", "spec_proposed_drafts", "spec_accepted_drafts")
    )


@pytest.mark.parametrize("topk", [2, 4])
def test_standalone_tree_greedy_identical(plain, tiny_llama_path, tiny_draft_path, topk):
    """topk 2: a perturbed draft model (some paths kept, some cut short); topk 4: the target as its own draft
    model (its argmax child of the root is always the target's token), with prefill chunks of 8 and a
    pool so small that requests are preempted."""
    prompts = _prompts(10, seed=3)
    want = plain.generate(input_ids=prompts, sampling_params=GREEDY)
    draft, options = (
        (tiny_draft_path, {"max_total_tokens": 4096})
        if topk == 2
        else (tiny_llama_path, {"max_total_tokens": 80, "chunked_prefill_size": 8})
    )
    with sgl_ray.Engine(
        tiny_llama_path,
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=draft,
        speculative_eagle_topk=topk,
        speculative_num_steps=3,
        **options,
    ) as engine:
        got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        verify_ct, proposed, accepted = _counts(got)
        assert verify_ct > 0 and 0 < accepted < proposed
        if draft == tiny_llama_path:
            assert engine.get_stats()["num_preemptions"] > 0
            assert accepted >= verify_ct  # the depth-1 argmax is the target's: at least one per step
        assert_pool_restored(engine)


def test_eagle_tree_greedy_and_seeded_identical(plain, tiny_llama_path, smollm2_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("tree_eagle")
    head = save_eagle_head(d / "e1", tiny_llama_path, "EAGLE", seed=1)
    prompts = _prompts(6, seed=1)
    with sgl_ray.Engine(
        tiny_llama_path,
        max_total_tokens=96,
        chunked_prefill_size=8,
        speculative_algorithm="EAGLE",
        speculative_draft_model_path=head,
        speculative_num_steps=3,
        speculative_eagle_topk=3,
        speculative_num_draft_tokens=7,
    ) as engine:
        got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        want = plain.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        assert _counts(got)[0] > 0 and engine.get_stats()["num_preemptions"] > 0
        assert_pool_restored(engine)
    # the copy head over its one-layer target keeps drafts; seeded sampling is the same token for token
    target = copy_target(d / "copy_target", smollm2_path)
    sampled = {"temperature": 0.8, "top_k": 40, "max_new_tokens": 16, "ignore_eos": True, "seed": 11}
    with sgl_ray.Engine(target, max_total_tokens=2048) as ref:
        want = ref.generate(input_ids=prompts[:3], sampling_params=[GREEDY, sampled, sampled])
    with sgl_ray.Engine(
        target,
        max_total_tokens=2048,
        speculative_algorithm="EAGLE",
        speculative_draft_model_path=copy_head_of(d / "copy_head", target),
        speculative_num_steps=3,
        speculative_eagle_topk=2,
    ) as engine:
        got = engine.generate(input_ids=prompts[:3], sampling_params=[GREEDY, sampled, sampled])
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        verify_ct, proposed, accepted = _counts(got)
        assert verify_ct > 0 and accepted > 0
        assert_pool_restored(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_standalone_tree_on_cuda(tmp_path):
    """On CUDA (float32, the Triton extend kernel's tree mask, decode CUDA graphs): the target as its own draft
    model in trees of topk 3 gives the tokens of decoding without speculation, and the pool ends where it began.
    (A random Llama written here: the GPU machine has no tokenizer packages.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    prompts = _prompts(6, seed=5)
    common = {"device": "cuda", "dtype": "float32", "max_total_tokens": 4096, "skip_tokenizer_init": True}
    with sgl_ray.Engine(str(tmp_path), **common) as plain_cuda:
        want = plain_cuda.generate(input_ids=prompts, sampling_params=GREEDY)
    with sgl_ray.Engine(
        str(tmp_path),
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=str(tmp_path),
        speculative_eagle_topk=3,
        speculative_num_steps=3,
        **common,
    ) as engine:
        got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        verify_ct, _, accepted = _counts(got)
        assert verify_ct > 0 and accepted >= verify_ct
        assert_pool_restored(engine)
