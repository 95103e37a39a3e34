"""EAGLE and EAGLE-3 heads over tiny random targets of the families beyond Llama: Qwen3-MoE (MoE routing in the
target), GPT-OSS (attention sinks, sliding-window layers, YaRN), DeepSeek-V3 (MLA, a dense and an MoE layer) and
Gemma 3 (embeddings times sqrt(hidden), sandwich norms, local and global layers, tied embeddings, logit caps).
Greedy outputs with the head are token-identical to the engine's without it (itself tested against transformers
in tests/engine), the KV pool is back where it started, and every chain the head drafts is the one a reference
head built from transformers' modules over the same target and head checkpoints drafts after the same tokens
(the captured layer inputs or final states of each family's target)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sgl_ray
from sgl_ray.errors import ModelLoadError

from ..conftest import save_tiny_model
from ..engine.test_deepseek import deepseek_config
from ..engine.test_gemma import gemma_config, save_gemma
from ..moe_models import moe_config
from .eagle_heads import ReferenceHead, record_drafts, save_eagle_head, save_head_for_family
from .test_spec_eagle import _prompts, _spec_counts
from .test_spec_engine import assert_pool_restored

FAMILIES = ("qwen3_moe", "gpt_oss", "deepseek_v3", "gemma3")
GREEDY = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
OPTIONS = {"max_total_tokens": 2048, "chunked_prefill_size": 16}


@pytest.fixture(scope="module")
def family_target(moe_model, smollm2_path, tmp_path_factory):
    """``family_target(name)`` -> (the directory of that family's tiny random model, its layer count)."""
    from sgl_ray.model_loader import load_tokenizer, resolve_model

    def get(name: str) -> tuple[str, int]:
        if name in ("qwen3_moe", "gpt_oss"):
            return moe_model(name), moe_config(name).num_hidden_layers
        if name == "deepseek_v3":
            config = deepseek_config("v3")
            return save_tiny_model(
                config, tmp_path_factory.mktemp(name), smollm2_path
            ), config.num_hidden_layers
        config = gemma_config("gemma3")
        tokenizer = load_tokenizer(resolve_model(smollm2_path))
        return save_gemma(config, tmp_path_factory.mktemp(name), tokenizer), config.num_hidden_layers

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_token_exact(family, family_target, tmp_path):
    """Per family: an EAGLE-1 head (the target's embedding and LM head shared) and an EAGLE-3 head (a 1,000-token
    draft vocabulary, reading the inputs of layers 0 and 1 and the stream after the last layer) draft 3-token
    chains over 3 concurrent requests in 16-token prefill chunks; the EAGLE-3 head's first two chains of one
    request (over its prompt's rows, then over the rows of a step) are the reference's."""
    target, layers = family_target(family)
    prompts = _prompts(3, seed=11)
    with sgl_ray.Engine(target, **OPTIONS) as plain:
        want = [o["output_ids"] for o in plain.generate(input_ids=prompts, sampling_params=GREEDY)]
    aux = [-1, 0, layers - 1]
    heads = {
        "EAGLE": save_head_for_family(tmp_path / "eagle", target, "EAGLE", seed=1),
        "EAGLE3": save_head_for_family(
            tmp_path / "eagle3", target, "EAGLE3", seed=2, draft_vocab=1000, aux_ids=aux
        ),
    }
    for algorithm, head in heads.items():
        spec = dict(
            speculative_algorithm=algorithm, speculative_draft_model_path=head, speculative_num_steps=3
        )
        with sgl_ray.Engine(target, **OPTIONS, **spec) as engine:
            got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
            assert [o["output_ids"] for o in got] == want, algorithm
            verify_ct, proposed, _ = _spec_counts(got)
            assert verify_ct > 0 and proposed > 0, algorithm
            if algorithm == "EAGLE3":
                seq, seen = record_drafts(engine, prompts[2], {**GREEDY, "max_new_tokens": 4})
            assert_pool_restored(engine)
    # EAGLE-3's drafts against the reference: the family's captured layer inputs and the shared embedding table,
    # read as stored (Gemma's sqrt(hidden) scale belongs to the target's forward, not to its table)
    reference = ReferenceHead(target, heads["EAGLE3"], "EAGLE3", tuple(i + 1 for i in aux))
    reference.embed = torch.nn.Embedding.from_pretrained(reference.target.get_input_embeddings().weight)
    assert len(seen) >= 2
    for position, drafts in seen[:2]:
        assert drafts == reference.drafts(seq[: position + 1], len(drafts)), position


def test_head_of_another_width_needs_its_own_embedding(tiny_llama_path, tmp_path):
    """An EAGLE-3 head 32 wide over the 64-wide tiny Llama (``target_hidden_size``) without an embedding of its
    own: the target's cannot stand in, a typed error at start."""
    like = tmp_path / "like"
    like.mkdir()
    shape = json.loads((Path(tiny_llama_path) / "config.json").read_text())
    shape.update(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16
    )
    (like / "config.json").write_text(json.dumps(shape))
    fc = torch.randn(32, 3 * 64) * 0.1
    head = save_eagle_head(
        tmp_path / "head", str(like), "EAGLE3", draft_vocab=1000, weights={"fc.weight": fc}
    )
    cfg = json.loads((tmp_path / "head" / "config.json").read_text())
    (tmp_path / "head" / "config.json").write_text(json.dumps({**cfg, "target_hidden_size": 64}))
    with pytest.raises(ModelLoadError, match="hidden size 32"):
        sgl_ray.Engine(
            tiny_llama_path,
            max_total_tokens=512,
            speculative_algorithm="EAGLE3",
            speculative_draft_model_path=head,
        )
