"""Tree drafts (``speculative_eagle_topk`` > 1): the tree search and walk on hand-made cases (the tree attention mask
is checked in tests/unit/test_tree_mask.py; here the MLA backends' against attention written out), and greedy (and
seeded) outputs of STANDALONE and EAGLE trees token-identical to decoding without speculation on tiny random
models — concurrent batches, prefill chunks of 8 tokens with preemption, pages of 4 tokens, LoRA adapters on the
target — with the KV pool back where it started. (Sampling: test_spec_sampling.py; MTP trees: test_spec_mtp.py.)"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

import sgl_ray
from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.errors import InvalidRequestError, UnsupportedFeatureError
from sgl_ray.speculative.config import SpeculativeConfig
from sgl_ray.speculative.tree import DraftTree, accept_tree, ancestor_masks, search_tree

from .eagle_heads import copy_head_of, copy_target, save_eagle_head
from .test_spec_engine import WORDS, assert_pool_restored, constrained_params

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
    pool of 4-token pages so small that requests are preempted."""
    prompts = _prompts(10, seed=3)
    want = plain.generate(input_ids=prompts, sampling_params=GREEDY)
    draft, options = (
        (tiny_draft_path, {"max_total_tokens": 4096})
        if topk == 2
        else (
            tiny_llama_path,
            # overlap off: with it, the pool also holds the worst case of the steps in flight, and a verify step
            # planned when it is full carries no drafts (the count below is of steps with drafts)
            {
                "max_total_tokens": 80,
                "chunked_prefill_size": 8,
                "page_size": 4,
                "disable_overlap_schedule": True,
            },
        )
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


def test_trees_under_a_grammar(plain, tiny_llama_path, tiny_draft_path):
    """Constrained requests draft trees too: the runner answers with each tree, and every node's row samples
    under the grammar's mask after the path to it. Greedy outputs equal decoding without speculation; sampled
    ones (each node's token drawn again at its position, under its mask) stay in the grammar."""
    prompts = _prompts(4, seed=4)
    params = constrained_params(NEW)
    want = plain.generate(input_ids=prompts, sampling_params=params)
    sampled = {"temperature": 0.9, "max_new_tokens": NEW, "ignore_eos": True, "seed": 8, "regex": WORDS}
    with sgl_ray.Engine(
        tiny_llama_path,
        max_total_tokens=4096,
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=tiny_llama_path,
        speculative_eagle_topk=3,
        speculative_num_steps=3,
    ) as engine:
        got = engine.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in got)
        meta = got[1]["meta_info"]  # the permissive grammar: the target's own argmax child mostly holds
        assert meta["spec_accepted_drafts"] >= meta["spec_verify_ct"] // 2
        for o in engine.generate(input_ids=prompts, sampling_params=sampled):
            assert re.fullmatch(WORDS + " ?", o["text"]) and o["meta_info"]["spec_verify_ct"] > 0
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


def test_tree_with_lora_on_the_target(tiny_llama_path, lora_adapters):
    """LoRA adapters on the target, the draft model (the base model) without them: trees give each request the
    tokens of decoding with its adapter without speculation; the base model's requests keep more drafts."""
    paths = [f"{n}={p}" for n, p in lora_adapters.items()][:2]
    names = [p.split("=")[0] for p in paths]
    prompts = _prompts(4, seed=8)
    loras = [names[0], names[1], None, names[0]]
    common = dict(lora_paths=paths, max_loras_per_batch=2, max_total_tokens=2048)
    with sgl_ray.Engine(tiny_llama_path, **common) as plain_lora:
        want = plain_lora.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=loras)
    spec = dict(
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=tiny_llama_path,
        speculative_eagle_topk=2,
        speculative_num_steps=3,
    )
    with sgl_ray.Engine(tiny_llama_path, **common, **spec) as engine:
        got = engine.generate(input_ids=prompts, sampling_params=GREEDY, lora_path=loras)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        metas = [o["meta_info"] for o in got]
        base = metas[2]  # the draft model's argmax child of each root is the target's token
        assert base["spec_verify_ct"] > 0 and base["spec_accepted_drafts"] >= base["spec_verify_ct"] - 1
        assert all(m["spec_accept_rate"] < base["spec_accept_rate"] for m in metas[:2])  # adapters differ
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


def test_mla_tree_mask():
    """Multi-head latent attention over draft trees: the torch MLA backend and the extend path of the Triton MLA
    backend (``extend_spans`` + ``attend_extends``, SDPA per request) give each node the attention of the request's
    prefix, its ancestors and itself (written out here in fp64), beside a causal extend and a decode row."""
    from sgl_ray.attention.base import TreeMask
    from sgl_ray.attention.mla.base import attend_extends, extend_spans
    from sgl_ray.attention.mla.torch_backend import TorchMLABackend

    from ..gpu.test_mla_attention import LAYER_ID, Dims, make_batch, make_case

    prefix, ext = [7, 9, 20, 3], [5, 4, 1, 7]
    parents = {0: [0, 0, 0, 1, 1], 3: [0, 0, 1, 1, 2, 3, 0]}  # each row's parent (row 0: the root)
    case = make_case(prefix, ext, Dims(), torch.float32, device="cpu", seed=4)
    blocks, offsets, off = [], np.full(4, -1), 0
    for r, par in parents.items():
        n = ext[r]
        m = torch.eye(n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j:
                j = par[j]
                m[i, j] = True
        blocks.append(m.reshape(-1))
        offsets[r], off = off, off + n * n
    backend = TorchMLABackend(torch.device("cpu"))
    batch = make_batch(case, backend)
    batch.tree_mask = TreeMask(torch.cat(blocks), offsets)
    backend.init_forward_metadata(batch)
    layer = case.layer
    with torch.no_grad():
        got = backend.forward_mla(case.q_nope, case.q_pe, case.latent, layer, batch)
        latents = case.pool.latent_buffers[LAYER_ID]
        spans = extend_spans(batch)
        assert [s.tree for s in spans] == [True, False, True]
        spans_out = torch.full_like(got, float("nan"))
        attend_extends(case.q_nope, case.q_pe, latents, spans, layer, spans_out)
    h, nope, c = layer.num_heads, layer.qk_nope_head_dim, layer.kv_lora_rank
    w = layer.kv_b_proj.weight.detach().double().view(h, nope + layer.v_head_dim, c)
    q_all = torch.cat([case.q_nope, case.q_pe], dim=-1).double()
    start = 0
    for r, (p, n) in enumerate(zip(prefix, ext, strict=True)):
        lat = latents[case.slots[r]].double()  # [S, C + R] the prefix, then this step's latents
        kv = torch.einsum("sc,hdc->hsd", lat[:, :c], w)
        k = torch.cat([kv[..., :nope], lat[None, :, c:].expand(h, -1, -1)], dim=-1)  # [H, S, nope + R]
        for i in range(n):
            seen = list(range(i + 1))
            if r in parents:
                seen, j = [i], i
                while j:
                    j = parents[r][j]
                    seen.append(j)
            keys = list(range(p)) + [p + j for j in sorted(seen)]
            scores = torch.einsum("hd,hsd->hs", q_all[start + i], k[:, keys]) * layer.scaling
            want = torch.einsum("hs,hsd->hd", scores.softmax(dim=-1), kv[:, keys, nope:]).float()
            torch.testing.assert_close(got[start + i], want, atol=1e-4, rtol=1e-4)
            if n > 1:
                torch.testing.assert_close(spans_out[start + i], want, atol=1e-4, rtol=1e-4)
        start += n
