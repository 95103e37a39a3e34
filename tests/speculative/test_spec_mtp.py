"""DeepSeek-V3's multi-token-prediction (MTP) layer as the drafter (``speculative_algorithm="EAGLE"`` or ``"NEXTN"``
without a draft path) in the in-process engine on CPU: a tiny random V3 (MLA, a dense and an MoE layer) whose
checkpoint carries a seeded random MTP layer (attention + MoE, its own LM head, the target's embedding). Greedy
outputs equal decoding without speculation over prompts of several lengths in small prefill chunks, every draft
equals the one the layer drafts when computed with transformers' DeepSeek-V3 modules, and the KV pool is back
where it started. A checkpoint whose MTP layer copies its one working decoder layer keeps most drafts."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV3Config

import sgl_ray
from sgl_ray.errors import InvalidRequestError, ModelLoadError

from .eagle_heads import record_drafts
from .test_spec_engine import assert_pool_restored

K = 3  # speculative_num_steps
GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
MTP = "model.layers.2"  # the MTP layer's tensors (two decoder layers before it)


def _config(num_hidden_layers: int) -> DeepseekV3Config:
    return DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=512,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,  # peaked logits: greedy choices are not decided by rounding
        tie_word_embeddings=False,
        num_hidden_layers=num_hidden_layers,
        first_k_dense_replace=1,  # layer 0 dense; layer 1 and the MTP layer (index 2) MoE
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=24,
        num_nextn_predict_layers=1,
        architectures=["DeepseekV3ForCausalLM"],
    )


def save_mtp_model(directory: Path, copy: bool) -> str:
    """A 2-layer V3 checkpoint with its MTP layer as ``model.layers.2.*``: the third decoder layer of a seeded
    random 3-layer model, plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and ``shared_head.head``
    (no ``embed_tokens``: the target's is shared).

    ``copy``: layer 0 adds nothing (zero output projections), the embeddings have unit RMS, the final norm is 1,
    and the MTP layer is layer 1 with ``eh_proj`` passing ``enorm(embed(x))`` through: it computes the target's
    next token, except that it attends over ``x_1 ..`` instead of ``x_0 ..``."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(3), dtype=torch.float32).save_pretrained(directory)
    _config(2).save_pretrained(directory)  # the target: 2 decoder layers
    w = load_file(str(directory / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    h, vocab = 64, 512
    w |= {
        f"{MTP}.enorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        f"{MTP}.hnorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        f"{MTP}.eh_proj.weight": 0.2 * torch.randn(h, 2 * h, generator=g),
        f"{MTP}.shared_head.norm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        f"{MTP}.shared_head.head.weight": 0.2 * torch.randn(vocab, h, generator=g),
    }
    if copy:
        e = w["model.embed_tokens.weight"]
        rms = e.pow(2).mean(dim=1, keepdim=True).sqrt()
        w["model.embed_tokens.weight"] = e / rms.clamp(
            min=1e-6
        )  # the padding token's zero row stays 0 (not NaN)
        w["model.layers.0.self_attn.o_proj.weight"].zero_()
        w["model.layers.0.mlp.down_proj.weight"].zero_()
        w["model.norm.weight"] = torch.ones(h)
        for name in [n for n in w if n.startswith(f"{MTP}.")]:
            del w[name]
        w |= {
            f"{MTP}.{n.removeprefix('model.layers.1.')}": t.clone() for n, t in w.items() if ".layers.1." in n
        }
        w |= {
            f"{MTP}.enorm.weight": torch.ones(h),
            f"{MTP}.hnorm.weight": torch.ones(h),
            f"{MTP}.eh_proj.weight": torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1),
            f"{MTP}.shared_head.norm.weight": torch.ones(h),
            f"{MTP}.shared_head.head.weight": w["lm_head.weight"].clone(),
        }
    save_file(w, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


class ReferenceMtp:
    """The chain drafts of the MTP layer computed with transformers' DeepSeek-V3 modules over the same checkpoint
    (SGLang's arithmetic, every row recomputed from scratch at each draft step): row ``p`` is ``(x_{p+1}, f_p)`` at
    position ``p``, ``f`` the target's final normed hidden state, and a draft row's ``f`` the layer's normed
    output."""

    def __init__(self, path: str) -> None:
        self.target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with tempfile.TemporaryDirectory() as tmp:  # the checkpoint as a 3-layer model: layer 2 is the MTP's
            _config(3).save_pretrained(tmp)
            (Path(tmp) / "model.safetensors").symlink_to(Path(path) / "model.safetensors")
            three = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        self.layer, self.rotary = three.model.layers[2], three.model.rotary_emb
        w = load_file(str(Path(path) / "model.safetensors"))
        self.w = {k.removeprefix(f"{MTP}."): v for k, v in w.items() if k.startswith(f"{MTP}.")}

    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def _rows(self, tokens: list[int], hidden: torch.Tensor) -> torch.Tensor:
        n, w = len(tokens), self.w
        e = self.target.model.embed_tokens(torch.tensor(tokens))
        x = (
            torch.cat([self._rms(e, w["enorm.weight"]), self._rms(hidden, w["hnorm.weight"])], -1)
            @ w["eh_proj.weight"].T
        )
        positions = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        out = self.layer(
            x[None],
            attention_mask=mask,
            position_ids=positions,
            position_embeddings=self.rotary(x[None], positions),
        )
        return self._rms(out[0], w["shared_head.norm.weight"])

    @torch.no_grad()
    def drafts(self, seq: list[int], k: int) -> list[int]:
        """The ``k`` chain drafts after ``seq`` (its last token the newest)."""
        tokens = list(seq[1:])
        hidden = self.target.model(input_ids=torch.tensor([seq[:-1]])).last_hidden_state[0]  # after the norm
        out = []
        for _ in range(k):
            normed = self._rows(tokens, hidden)
            out.append(int((normed[-1] @ self.w["shared_head.head.weight"].T).argmax()))
            tokens.append(out[-1])
            hidden = torch.cat([hidden, normed[-1:]])
        return out


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("mtp")
    return {"random": save_mtp_model(d / "random", False), "copy": save_mtp_model(d / "copy", True)}


def _engine(path: str, spec: dict | None = None, **options) -> sgl_ray.Engine:
    return sgl_ray.Engine(path, max_total_tokens=2048, skip_tokenizer_init=True, **options, **(spec or {}))


def _greedy(engine: sgl_ray.Engine, prompts: list[list[int]]) -> list[list[int]]:
    return [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=GREEDY)]


def test_greedy_outputs_identical_and_drafts_match_reference(models):
    """NEXTN with the target's own path (SGLang's alias of EAGLE), prompts of 3 to 40 tokens in 8-token prefill
    chunks: the tokens of decoding without speculation, and every chain the MTP layer drafts for one request is
    the reference's after the same tokens."""
    path = models["random"]
    prompts = _prompts([3, 9, 21, 40])
    with _engine(path) as plain:
        want = _greedy(plain, prompts)
    spec = dict(speculative_algorithm="NEXTN", speculative_draft_model_path=path, speculative_num_steps=K)
    with _engine(path, spec, chunked_prefill_size=8) as engine:
        runner = engine._core.runner
        draft = runner.spec.draft
        assert type(draft).__name__ == "MtpDraft"
        assert draft.head.missing == {"model.embed_tokens.weight"}  # its own LM head, the target's embedding
        assert draft.head.model.embed_tokens is runner.model.model.embed_tokens
        pool = draft.runner.kv_pool  # one MLA latent per token, one layer
        assert type(pool).__name__ == "MLAKVPool" and len(pool.latent_buffers) == 1 and pool.head_dim == 40
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == want
        for o in outs:
            meta = o["meta_info"]
            assert meta["spec_verify_ct"] > 0 and meta["spec_accept_length"] >= 1.0
        assert engine.get_stats()["spec_proposed_drafts"] > 0
        assert_pool_restored(engine)

        seq, seen = record_drafts(engine, prompts[2], {**GREEDY, "max_new_tokens": 10})
        assert_pool_restored(engine)
    reference = ReferenceMtp(path)
    assert len(seen) >= 3
    for position, drafts in seen[:4]:
        assert drafts == reference.drafts(seq[: position + 1], len(drafts)), position


def test_copy_layer_accept_length(models):
    """An MTP layer that reproduces the target (up to its first token) keeps most drafts: more than two tokens per
    verify step of the four possible, with outputs unchanged — also in a pool too small for the batch, where
    requests are preempted and the layer's rows recomputed when they resume."""
    path = models["copy"]
    prompts = _prompts([5, 17, 30, 11, 24, 8], seed=1)
    with _engine(path) as plain:
        want = _greedy(plain, prompts)
    spec = dict(speculative_algorithm="EAGLE", speculative_num_steps=K)
    with _engine(path, spec, chunked_prefill_size=8) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == want
        stats = engine.get_stats()
        assert stats["spec_accept_length"] > 2.0, stats
        assert all(o["meta_info"]["spec_accept_length"] > 1.5 for o in outs)
        assert_pool_restored(engine)
    with sgl_ray.Engine(
        path, max_total_tokens=64, chunked_prefill_size=8, page_size=4, skip_tokenizer_init=True, **spec
    ) as engine:
        assert _greedy(engine, prompts) == want
        stats = engine.get_stats()
        assert stats["num_preemptions"] > 0 and stats["spec_accept_length"] > 2.0, stats
        assert_pool_restored(engine)


def test_tree_drafts(models):
    """Tree drafts (topk 2, 6 nodes over 3 depths) from the copy layer on the MLA target (tree masks in the MLA
    extend path; the accepted path's latents moved): the tokens of decoding without speculation, most drafts
    kept, with pages of 4 in a pool so small that requests are preempted."""
    path = models["copy"]
    prompts = _prompts([5, 17, 30, 11, 24, 8], seed=1)
    with _engine(path) as plain:
        want = _greedy(plain, prompts)
    spec = dict(speculative_algorithm="EAGLE", speculative_num_steps=K, speculative_eagle_topk=2)
    with sgl_ray.Engine(
        path, max_total_tokens=64, chunked_prefill_size=8, page_size=4, skip_tokenizer_init=True, **spec
    ) as engine:
        assert _greedy(engine, prompts) == want
        stats = engine.get_stats()
        assert stats["num_preemptions"] > 0 and stats["spec_accept_length"] > 1.5, stats
        assert_pool_restored(engine)


def test_targets_without_mtp_layer(models, tiny_llama_path, tmp_path):
    """EAGLE without a draft path on a target without an MTP layer, or on a V3 checkpoint that lacks its tensors,
    is a typed error at start."""
    eagle = dict(speculative_algorithm="EAGLE")
    with pytest.raises(InvalidRequestError, match="speculative_draft_model_path") as info:
        _engine(tiny_llama_path, eagle)
    assert info.value.param == "speculative_draft_model_path"

    stripped = tmp_path / "stripped"
    stripped.mkdir()
    _config(2).save_pretrained(stripped)
    w = load_file(str(Path(models["random"]) / "model.safetensors"))
    save_file(
        {k: v for k, v in w.items() if not k.startswith(f"{MTP}.")}, str(stripped / "model.safetensors")
    )
    with pytest.raises(ModelLoadError, match="multi-token-prediction"):
        _engine(str(stripped), eagle)

    none = tmp_path / "none"
    none.mkdir()
    cfg = _config(2)
    cfg.num_nextn_predict_layers = 0
    cfg.save_pretrained(none)
    (none / "model.safetensors").symlink_to(stripped / "model.safetensors")
    with pytest.raises(InvalidRequestError, match="num_nextn_predict_layers=0") as info:
        _engine(str(none), {**eagle, "speculative_draft_model_path": str(none)})
    assert info.value.param == "speculative_draft_model_path"


def test_options():
    """NEXTN is EAGLE; EAGLE without a draft path (or with the target's own) drafts with the MTP layer; EAGLE3
    still needs its head."""
    from sgl_ray.configs.engine_args import EngineArgs
    from sgl_ray.speculative import SpeculativeConfig

    def cfg(**options) -> SpeculativeConfig:
        return SpeculativeConfig.from_args(EngineArgs(**options))

    nextn = cfg(speculative_algorithm="nextn", speculative_num_steps=2)
    assert (nextn.algorithm, nextn.uses_mtp, nextn.num_draft_tokens) == ("EAGLE", True, 3)
    assert cfg(model_path="/m", speculative_algorithm="EAGLE", speculative_draft_model_path="/m").uses_mtp
    head = cfg(model_path="/m", speculative_algorithm="EAGLE", speculative_draft_model_path="/h")
    assert not head.uses_mtp and head.draft_model_path == "/h"
    with pytest.raises(InvalidRequestError) as info:
        cfg(speculative_algorithm="EAGLE3")
    assert info.value.param == "speculative_draft_model_path"
