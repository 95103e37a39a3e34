"""A step whose every row is sampled (a speculative verify step of chains) can run as one decode row per token:
row ``i`` of a request, at position ``P + i``, reads the request's KV up to its own position, which a decode at
that position does. ``StepPlan.decode_rows`` gives the rows' positions; on CUDA such steps replay the decode
graphs with them. Here the decomposition is checked eagerly on the CPU (torch attention backend): the logits of
the rows run as decodes equal those of the extend step."""

from __future__ import annotations

import numpy as np
import torch

from sgl_ray.runner.forward_batch import ForwardBatch
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.plan import NewRequest, StepPlan

_I64 = np.int64
SLOTS = (5, 6)  # request slots and KV slots of their own in the shared runner
KV0 = 900  # first KV slot used here (the shared pool has more; other tests start low)


def _prefill(runner, prompts: list[list[int]]) -> None:
    lens = np.array([len(p) for p in prompts], dtype=_I64)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    runner.execute(
        StepPlan(
            step_id=1,
            new_requests=[
                NewRequest(
                    req_pool_idx=s, sampling=greedy, seed=0, eos_token_ids=[], prompt_ids=[], output_ids=[]
                )
                for s in SLOTS
            ],
            req_pool_idxs=np.array(SLOTS, dtype=_I64),
            prefix_lens=np.zeros(2, dtype=_I64),
            extend_lens=lens,
            input_ids=np.array([t for p in prompts for t in p], dtype=_I64),
            out_cache_loc=np.arange(KV0, KV0 + lens.sum(), dtype=_I64),
            sample=np.ones(2, dtype=np.bool_),
            top_logprobs_num=np.full(2, -1, dtype=_I64),
            input_logprob_start=np.full(2, -1, dtype=_I64),
            input_logprob_counts=np.zeros(2, dtype=_I64),
        )
    )


def test_verify_rows_run_as_decode_rows(model):
    runner, _ = model
    prompts = [[11, 22, 33, 44, 55], [66, 77, 88, 99, 111, 122, 133]]
    _prefill(runner, prompts)
    prefix = np.array([len(p) for p in prompts], dtype=_I64)
    chunks = [[201, 202, 203, 204], [301, 302, 303]]  # [x, drafts...] of each request
    ext = np.array([len(c) for c in chunks], dtype=_I64)
    first = KV0 + int(prefix.sum())
    plan = StepPlan(
        step_id=2,
        req_pool_idxs=np.array(SLOTS, dtype=_I64),
        prefix_lens=prefix,
        extend_lens=ext,
        input_ids=np.array([t for c in chunks for t in c], dtype=_I64),
        out_cache_loc=np.arange(first, first + ext.sum(), dtype=_I64),
        sample=np.ones(2, dtype=np.bool_),
        sample_counts=ext,
        top_logprobs_num=np.full(2, 8, dtype=_I64),
        input_logprob_start=np.full(2, -1, dtype=_I64),
        input_logprob_counts=np.zeros(2, dtype=_I64),
    )
    extend = runner.execute(plan)  # the extend path: every row sampled

    rows = plan.decode_rows()
    assert rows is not None and rows.tolist() == [5, 6, 7, 8, 7, 8, 9]
    n = plan.num_tokens
    req_rows = torch.from_numpy(np.repeat(plan.req_pool_idxs, ext))
    batch = ForwardBatch(
        input_ids=torch.from_numpy(plan.input_ids),
        positions=torch.from_numpy(rows),
        out_cache_loc=torch.from_numpy(plan.out_cache_loc),
        req_pool_idxs=req_rows,
        seq_lens=torch.from_numpy(rows + 1),
        extend_start_loc=torch.arange(n),
        logits_indices=torch.arange(n),
        prefix_lens_cpu=rows,
        extend_lens_cpu=np.ones(n, dtype=_I64),
        kv_pool=runner.kv_pool,
        req_to_token=runner.req_table.table,
        attn_backend=runner.attn_backend,
        moe_backend=runner.moe_backend,
    )
    runner.attn_backend.init_forward_metadata(batch)
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(batch)).float()
    top_vals, top_ids = torch.log_softmax(logits, dim=-1).topk(8, dim=-1)
    assert top_ids.tolist() == extend.top_ids.tolist()
    torch.testing.assert_close(top_vals, torch.from_numpy(extend.top_vals).float(), atol=1e-4, rtol=1e-4)
    assert logits.argmax(dim=-1).tolist() == extend.next_token_ids.tolist()


def test_plans_that_are_not_decode_rows():
    base = dict(
        step_id=1,
        req_pool_idxs=np.array([0, 1], dtype=_I64),
        prefix_lens=np.array([3, 4], dtype=_I64),
        extend_lens=np.array([2, 1], dtype=_I64),
        input_ids=np.arange(3, dtype=_I64),
        out_cache_loc=np.arange(3, dtype=_I64),
        sample=np.ones(2, dtype=np.bool_),
        top_logprobs_num=np.full(2, -1, dtype=_I64),
        input_logprob_start=np.full(2, -1, dtype=_I64),
        input_logprob_counts=np.zeros(2, dtype=_I64),
    )
    assert StepPlan(**base).decode_rows() is None  # a prompt chunk samples its last row only
    every = StepPlan(**base, sample_counts=np.array([2, 1], dtype=_I64))
    assert every.decode_rows().tolist() == [3, 4, 4]
    logprobs = {**base, "input_logprob_start": np.array([0, -1], dtype=_I64)}
    assert StepPlan(**logprobs, sample_counts=np.array([2, 1], dtype=_I64)).decode_rows() is None
    tree = StepPlan(
        **base, sample_counts=np.array([2, 1], dtype=_I64), draft_lens=np.array([1, 0], dtype=_I64)
    )
    assert tree.decode_rows() is not None  # chains: decode rows
    tree.draft_parents = np.zeros(1, dtype=_I64)  # an NGRAM tree needs its mask
    assert tree.decode_rows() is None
