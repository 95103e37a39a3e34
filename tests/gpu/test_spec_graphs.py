"""CUDA graphs in speculative steps: a draft model's decode passes (STANDALONE chains) replay the draft model's
decode graphs, and verify steps of chains replay the target's decode graphs, one decode row per token
(``StepPlan.decode_rows``). The same drafts and the same verification as eager steps, so the same accepted counts,
and the target's tokens unchanged. (A random Llama written here: the GPU machine has no tokenizer packages.)"""

from __future__ import annotations

import random

import pytest
import torch

import sgl_ray

from ..speculative.conftest import perturbed_copy
from ..speculative.test_spec_engine import assert_pool_restored

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}


COMMON = {"device": "cuda", "dtype": "float32", "max_total_tokens": 4096, "skip_tokenizer_init": True}
COUNTS = ("spec_verify_ct", "spec_proposed_drafts", "spec_accepted_drafts")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("spec_graphs")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(d / "target")
    target = str(d / "target")
    return target, perturbed_copy(target, d / "draft", noise=0.05, seed=5)


def _prompts(repeat: bool) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(rng.randrange(4, 50))] for _ in range(6)]
    return [p + p for p in prompts] if repeat else prompts  # NGRAM drafts from the repeated half


@pytest.mark.parametrize("algorithm", ["STANDALONE", "NGRAM"])
def test_draft_and_verify_steps_replay_graphs(pair, algorithm):
    target, draft = pair
    prompts = _prompts(repeat=algorithm == "NGRAM")
    spec = (
        dict(speculative_algorithm="STANDALONE", speculative_draft_model_path=draft, speculative_num_steps=4)
        if algorithm == "STANDALONE"
        else dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=5)
    )
    with sgl_ray.Engine(target, **COMMON) as plain:
        want = plain.generate(input_ids=prompts, sampling_params=GREEDY)
    with sgl_ray.Engine(target, **COMMON, **spec, disable_cuda_graph=True) as eager:
        ref = eager.generate(input_ids=prompts, sampling_params=GREEDY)
        assert eager._core.runner.cuda_graphs is None
    with sgl_ray.Engine(target, **COMMON, **spec) as engine:
        runner = engine._core.runner
        before = runner.cuda_graphs.num_replays
        got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        assert [[o["meta_info"][k] for k in COUNTS] for o in got] == [
            [o["meta_info"][k] for k in COUNTS] for o in ref
        ]
        verify_steps = engine.get_stats()["spec_verify_steps"]
        assert sum(o["meta_info"]["spec_accepted_drafts"] for o in got) > 0
        # every decode step of the batch is a verify step of chains: each one a replay of the target's graphs
        assert runner.cuda_graphs.num_replays - before >= verify_steps // len(prompts)
        if algorithm == "STANDALONE":
            assert runner.spec.draft.graphs is not None and runner.spec.draft.graphs.num_replays > 0
        assert_pool_restored(engine)
