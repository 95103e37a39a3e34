"""DeepSeek (MLA) models in the engine on CUDA: the Triton MLA decode inside CUDA graphs against transformers
(fp32, token-exact) and against eager steps and the torch MLA backend, prefix-cache hits over cached latents, and a
DeepSeek-V3-shaped MoE model in bf16. Run on the device machine (``pytest -m gpu``); skipped where there is no GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW = 8
TOL = 0.2  # logprob tolerance against transformers' bf16 (teacher-forced on the engine's own tokens)
_SHAPE = dict(
    hidden_size=512,
    num_attention_heads=16,
    num_hidden_layers=3,
    intermediate_size=1024,
    moe_intermediate_size=256,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    q_lora_rank=256,
    kv_lora_rank=512,  # DeepSeek-V2/V3's latent: 512 + 64 values per token and layer
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    vocab_size=32000,
    max_position_embeddings=4096,
    initializer_range=0.1,  # peaked logits and router scores
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``model_dir("dense" | "moe", dtype)``: a DeepSeek-V3-shaped model, every layer dense (the MoE layer's own
    GPU tests are elsewhere) or dense then MoE."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    made: dict[tuple[str, torch.dtype], str] = {}

    def get(kind: str, dtype: torch.dtype) -> str:
        if (kind, dtype) not in made:
            dense = _SHAPE["num_hidden_layers"] if kind == "dense" else 1
            torch.manual_seed(0)
            cfg = DeepseekV3Config(**_SHAPE, first_k_dense_replace=dense)
            path = tmp_path_factory.mktemp(f"deepseek_{kind}")
            AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(path)
            made[kind, dtype] = str(path)
        return made[kind, dtype]

    return get


def _prompts() -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of 5 to 300 tokens, and three that share a 200-token prefix."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 32000, (n,), generator=g).tolist() for n in (5, 37, 128, 300)]
    prefix = torch.randint(10, 32000, (200,), generator=g).tolist()
    shared = [prefix + torch.randint(10, 32000, (n,), generator=g).tolist() for n in (3, 40, 101)]
    return prompts, shared


def _engine(path: str, dtype: str, **kw):
    import sgl_ray

    return sgl_ray.Engine(
        path, dtype=dtype, skip_tokenizer_init=True, max_total_tokens=16384, cuda_graph_max_bs=8, **kw
    )


def _greedy(engine, prompts):
    params = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
    return engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)


def test_engine_fp32_matches_transformers(model_dir):
    """The Triton MLA decode replayed from CUDA graphs, the up-projected extend and prefix-cache hits over
    cached latents: transformers' greedy tokens (fp32)."""
    path = model_dir("dense", torch.float32)
    prompts, shared = _prompts()
    with _engine(path, "float32") as eng:
        runner = eng._core.runner
        assert type(runner.attn_backend).__name__ == "TritonMLABackend"
        assert runner.kv_pool.head_dim == 576
        outs = _greedy(eng, prompts) + _greedy(eng, shared[:1])
        rest = _greedy(eng, shared[1:])
        assert runner.cuda_graphs is not None and runner.cuda_graphs.num_replays > 0
    assert all(o["meta_info"]["cached_tokens"] >= 200 for o in rest)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    hf.generation_config.eos_token_id = None  # run to NEW tokens, as the engine (ignore_eos)
    for prompt, out in zip(prompts + shared, outs + rest, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
        assert out["output_ids"] == want[0, len(prompt) :].tolist(), len(prompt)


def test_graphs_match_eager_and_torch_backend(model_dir):
    """Graph replays = eager Triton steps = the torch MLA backend on CUDA: tokens, and logprobs within 1e-3
    (fp32)."""
    path = model_dir("dense", torch.float32)
    prompts = _prompts()[0]
    runs = {}
    for key, kw in (
        ("graphs", {}),
        ("eager", {"disable_cuda_graph": True}),
        ("torch", {"attention_backend": "torch"}),
    ):
        with _engine(path, "float32", **kw) as eng:
            runs[key] = _greedy(eng, prompts)
    for key in ("eager", "torch"):
        for want, got in zip(runs["graphs"], runs[key], strict=True):
            assert got["output_ids"] == want["output_ids"], key
            for (lp_w, _), (lp_g, _) in zip(
                want["meta_info"]["output_token_logprobs"],
                got["meta_info"]["output_token_logprobs"],
                strict=True,
            ):
                assert lp_g == pytest.approx(lp_w, abs=1e-3), key


def test_moe_engine_bf16_matches_transformers(model_dir):
    """The V3 MoE (sigmoid routing, groups, shared expert) with MLA in bf16: every token within bf16 noise of
    transformers' best at its position (teacher-forced on the engine's own output), and transformers' choice where
    it leads by more than that."""
    from transformers import AutoModelForCausalLM

    path = model_dir("moe", torch.bfloat16)
    prompts = _prompts()[0]
    with _engine(path, "bfloat16") as eng:
        outs = _greedy(eng, prompts)
        assert eng._core.runner.cuda_graphs.num_replays > 0
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    for ids, out in zip(prompts, outs, strict=True):
        full = torch.tensor([ids + out["output_ids"]], device="cuda")
        with torch.no_grad():
            logp = torch.log_softmax(hf(full).logits[0].float(), -1)
        for i, tok in enumerate(out["output_ids"]):
            row = logp[len(ids) - 1 + i]
            top2 = row.topk(2).values
            assert row[tok].item() >= top2[0].item() - TOL, (i, row[tok].item(), top2.tolist())
            if (top2[0] - top2[1]).item() > 2 * TOL:
                assert tok == int(row.argmax()), (i, top2.tolist())
