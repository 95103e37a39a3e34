"""The engine on CUDA: greedy output against transformers (bf16) and tensor parallelism over NCCL against one
GPU. Run on the device machine (``pytest -m gpu``); skipped where there is no GPU."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch

from .backends import ATTENTION_BACKENDS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW = 8
TOL = 0.15  # logprob tolerance: logits of magnitude ~20 carry bf16 rounding of ~0.06
# The first token's logprob against transformers': on an H200 (2026-11-28) the 300-token prompt differed by 0.18 with
# the torch reference backend, 0.13 with Triton and 0.06-0.19 with FlashInfer (bf16 attention and GEMMs, 4 layers).
FIRST_LP_TOL = 0.25


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A random Llama-shaped bf16 model (GQA 16/8 heads, head_dim 64), peaked logits so greedy has clear winners."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("llama_bf16")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def scaled_norms_dir(llama_dir, tmp_path_factory) -> str:
    """``llama_dir`` with random RMSNorm scales (1 ± 0.2): what folding them into the projections must keep."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=g))
    path = tmp_path_factory.mktemp("llama_scaled_norms")
    model.save_pretrained(path)
    return str(path)


def _r(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, 32000, (n,), generator=g).tolist() for n in (5, 37, 128, 300)]


def _greedy(engine, prompts):
    return engine.generate(
        input_ids=prompts,
        sampling_params={"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True},
        return_logprob=True,
        top_logprobs_num=5,
    )


def _assert_same_greedy(expected: dict, got: dict, tol: float) -> None:
    """Two runs of one request: the same tokens, and each token's logprob within ``tol``."""
    assert got["output_ids"] == expected["output_ids"]
    for (lp_e, _), (lp_g, _) in zip(
        expected["meta_info"]["output_token_logprobs"], got["meta_info"]["output_token_logprobs"], strict=True
    ):
        assert lp_g == pytest.approx(lp_e, abs=tol)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_engine_matches_transformers_bf16(llama_dir, backend):
    from transformers import AutoModelForCausalLM

    import sgl_ray

    prompts = _prompts()
    with sgl_ray.Engine(
        llama_dir,
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_total_tokens=8192,
        attention_backend=backend,
    ) as eng:
        outs = _greedy(eng, prompts)
        graphs = eng._core.runner.cuda_graphs
        assert graphs is not None and graphs.num_replays > 0  # decode steps replayed from CUDA graphs
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda().eval()
    for ids, out in zip(prompts, outs, strict=True):
        full = torch.tensor([ids + out["output_ids"]], device="cuda")
        with torch.no_grad():
            logp = torch.log_softmax(hf(full).logits[0].float(), -1)  # [len, vocab]
        # The first token is transformers' greedy choice; every later one is (teacher-forced on the engine's own
        # output) within bf16 noise of transformers' best at that position.
        assert out["output_ids"][0] == int(logp[len(ids) - 1].argmax())
        for i, tok in enumerate(out["output_ids"]):
            row = logp[len(ids) - 1 + i]
            assert row[tok].item() >= row.max().item() - TOL
        first_lp, first_tok = out["meta_info"]["output_token_logprobs"][0]
        assert first_lp == pytest.approx(logp[len(ids) - 1, first_tok].item(), abs=FIRST_LP_TOL)


def _one_at_a_time(model_dir: str, fold: bool, monkeypatch) -> list[dict]:
    """Greedy runs of ``[[17]] + _prompts()``, each alone (one-row decode steps, and a one-row prefill), with the
    norm scales folded or not; checks that the folded path ran exactly when folding."""
    import sgl_ray
    from sgl_ray.layers import fused_linear
    from sgl_ray.models.llama import LlamaDecoderLayer

    monkeypatch.setattr(fused_linear, "FOLD_NORMS", fold)
    calls = []
    folded = LlamaDecoderLayer.forward_folded
    monkeypatch.setattr(
        LlamaDecoderLayer, "forward_folded", lambda self, *a: calls.append(1) or folded(self, *a)
    )
    with sgl_ray.Engine(model_dir, dtype="bfloat16", skip_tokenizer_init=True, max_total_tokens=8192) as eng:
        model = eng._core.runner.model.model
        assert model.norms_folded == fold
        assert all(bool((layer.input_layernorm.weight == 1).all()) == fold for layer in model.layers)
        outs = [_greedy(eng, [ids])[0] for ids in [[17]] + _prompts()]
    assert bool(calls) == fold, "the folded path ran where it should not, or not where it should"
    return outs


def test_folded_norms_are_as_accurate_as_the_norm_kernels(scaled_norms_dir, monkeypatch):
    """One-row steps on a model whose norm scales are folded into the projections (every norm inside the GEMVs
    around it, rotary and the KV store in the QKV GEMV) against the same steps with the norm kernels, both
    measured against transformers in fp32 on the same weights (teacher-forced on each run's own tokens): the
    first token is the reference's choice, and the engine's logprob of each chosen token is as close to the
    reference's on average. Folding rounds differently from transformers' bf16 path (W diag(g) once, the normed
    row not at all), so against a bf16 reference the norm kernels, which copy its rounding, would win unfairly."""
    from transformers import AutoModelForCausalLM

    prompts = [[17]] + _prompts()
    runs = {fold: _one_at_a_time(scaled_norms_dir, fold, monkeypatch) for fold in (True, False)}
    ref = AutoModelForCausalLM.from_pretrained(scaled_norms_dir, dtype=torch.float32).cuda().eval()
    stats, report = {}, []
    for fold, outs in runs.items():
        diffs, gaps = [], []
        for ids, out in zip(prompts, outs, strict=True):
            toks = out["output_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(ref(torch.tensor([ids + toks], device="cuda")).logits[0].float(), -1)
            rows = logp[len(ids) - 1 : len(ids) - 1 + NEW]
            assert toks[0] == int(rows[0].argmax()), f"fold={fold}, {len(ids)}-token prompt"
            lps = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
            diffs += [abs(lp - row[t].item()) for lp, row, t in zip(lps, rows, toks, strict=True)]
            gaps += [(row.max() - row[t]).item() for row, t in zip(rows, toks, strict=True)]
        stats[fold] = (sum(diffs) / len(diffs), max(diffs), max(gaps))
        report.append(f"fold={fold}: logprob diff mean {stats[fold][0]:.3f} max {stats[fold][1]:.3f}; "
                      f"max gap below the best {stats[fold][2]:.3f}; diffs {_r(diffs)}")  # fmt: skip
    print(*report, sep="\n")
    assert stats[True][0] <= 1.5 * stats[False][0] + 0.02, "\n".join(report)
    assert max(stats[True][1], stats[True][2]) < 2.0, "\n".join(report)  # no token far off


def test_cuda_graphs_match_eager(llama_dir):
    """Decode replayed from CUDA graphs (padded batch sizes, a batch that shrinks as requests finish) gives the
    eager path's greedy tokens and logprobs. In float32: in bf16 the padded GEMMs pick other kernels, and rounding
    differences flip near-tied greedy choices of a random model."""
    import sgl_ray

    g = torch.Generator().manual_seed(2)
    prompts = [
        torch.randint(10, 32000, (int(n),), generator=g).tolist() for n in torch.randint(3, 400, (11,))
    ]
    params = [
        {"temperature": 0.0, "max_new_tokens": 4 + 3 * i, "ignore_eos": True} for i in range(len(prompts))
    ]
    results = {}
    for disable in (True, False):
        with sgl_ray.Engine(
            llama_dir,
            dtype="float32",
            skip_tokenizer_init=True,
            max_total_tokens=16384,
            disable_cuda_graph=disable,
            cuda_graph_max_bs=16,
        ) as eng:
            graphs = eng._core.runner.cuda_graphs
            assert (graphs is None) == disable
            results[disable] = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
            if graphs is not None:
                assert graphs.batch_sizes == [1, 2, 4, 8, 16]
                assert graphs.num_replays >= max(p["max_new_tokens"] for p in params) - 2
    for eager, graphed in zip(results[True], results[False], strict=True):
        _assert_same_greedy(eager, graphed, 1e-3)


def test_short_sequence_graphs_hand_over_to_full_length_ones(llama_dir):
    """Batches of one or two requests replay from graphs captured for short sequences (up to SHORT_DECODE_TOKENS
    for one request; other attention kernels) and, once a request grows past that, from the full-length ones;
    the greedy tokens are the eager path's throughout (bf16, one request: no padded GEMMs)."""
    import sgl_ray
    from sgl_ray.attention.triton_kernels import SHORT_DECODE_TOKENS as SHORT

    prompt = torch.randint(10, 32000, (SHORT - 12,), generator=torch.Generator().manual_seed(5)).tolist()
    greedy = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}
    outs, counts = {}, collections.Counter()
    for disable in (True, False):
        with sgl_ray.Engine(
            llama_dir, skip_tokenizer_init=True, disable_cuda_graph=disable, cuda_graph_max_bs=4
        ) as eng:
            graphs = eng._core.runner.cuda_graphs
            if graphs is not None:
                assert graphs.seq_lens == {
                    1: (SHORT, 4096),
                    2: (SHORT // 2, 4096),
                    4: (4096,),
                }

                class Counted:
                    def __init__(self, key, graph):
                        self.key, self.graph = key, graph

                    def replay(self):
                        counts[self.key] += 1
                        self.graph.replay()

                graphs._graphs = {k: Counted(k, g) for k, g in graphs._graphs.items()}
            outs[disable] = eng.generate(input_ids=[prompt], sampling_params=greedy, return_logprob=True)[0]
    # positions 1012 .. 1034 are decoded: 12 steps fit the short graphs, the rest need the full-length ones
    assert counts[1, False, SHORT] >= 10 and counts[1, False, 4096] >= 10, counts
    _assert_same_greedy(outs[True], outs[False], TOL)


def test_pages_larger_than_one_token_give_the_same_tokens(llama_dir):
    """KV pages of 16 tokens (radix matches and inserts whole pages, the Triton kernels read the slots the pages
    give, decode replays from CUDA graphs) against pages of one token: the same greedy tokens and logprobs for
    requests that share a 200-token prefix, and every cache hit a whole number of pages. In float32, so that the
    two runs' different prefill splits cannot flip a near-tied greedy choice."""
    import sgl_ray

    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(10, 32000, (200,), generator=g).tolist()
    prompts = [prefix + torch.randint(10, 32000, (n,), generator=g).tolist() for n in (3, 17, 40, 101)]
    greedy = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    outs = {}
    for page in (1, 16):
        kwargs = dict(dtype="float32", skip_tokenizer_init=True, max_total_tokens=16384, cuda_graph_max_bs=8)
        with sgl_ray.Engine(llama_dir, page_size=page, **kwargs) as eng:
            first = eng.generate(input_ids=prompts[:1], sampling_params=greedy, return_logprob=True)
            rest = eng.generate(input_ids=prompts[1:], sampling_params=greedy, return_logprob=True)
            assert eng._core.runner.cuda_graphs.num_replays > 0
        cached = [o["meta_info"]["cached_tokens"] for o in rest]
        assert all(c >= 200 - page and c % page == 0 for c in cached), (page, cached)
        outs[page] = first + rest
    for small, large in zip(outs[1], outs[16], strict=True):
        _assert_same_greedy(small, large, 1e-3)


def test_overlap_schedule_matches_synchronous(llama_dir):
    """Steps launched before the previous one's tokens are back (placeholders resolved on the device, CUDA
    graphs on) give the synchronous schedule's tokens, also for requests that a sampled stop token ends early."""
    import sgl_ray

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 32000, (int(n),), generator=g).tolist() for n in torch.randint(3, 300, (6,))]
    kwargs = dict(dtype="float32", skip_tokenizer_init=True, max_total_tokens=16384, cuda_graph_max_bs=8)
    greedy = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    with sgl_ray.Engine(llama_dir, disable_overlap_schedule=True, **kwargs) as eng:
        free = eng.generate(input_ids=prompts, sampling_params=greedy)
    params = [{**greedy, "stop_token_ids": [o["output_ids"][3 + i]]} for i, o in enumerate(free)]
    outs = {}
    for disable in (True, False):
        with sgl_ray.Engine(llama_dir, disable_overlap_schedule=disable, **kwargs) as eng:
            # fp32 heads run one decode shape at any length: one graph per batch size
            assert all(lens == (4096,) for lens in eng._core.runner.cuda_graphs.seq_lens.values())
            outs[disable] = eng.generate(input_ids=prompts, sampling_params=params)
    for sync, overlapped in zip(outs[True], outs[False], strict=True):
        assert overlapped["output_ids"] == sync["output_ids"]
        assert overlapped["meta_info"]["finish_reason"] == sync["meta_info"]["finish_reason"]
    assert any(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs[False])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_nccl_matches_one_gpu(llama_dir):
    import ray

    import sgl_ray

    assert os.environ.get("NCCL_NVLS_ENABLE") == "0", "keep NVLink multicast off on shared hosts"
    prompts = _prompts()
    with sgl_ray.Engine(llama_dir, dtype="bfloat16", skip_tokenizer_init=True, max_total_tokens=8192) as one:
        base = _greedy(one, prompts)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    with sgl_ray.Engine(
        llama_dir, dtype="bfloat16", skip_tokenizer_init=True, max_total_tokens=8192, tp_size=2
    ) as tp:
        outs = _greedy(tp, prompts)
        # Decode-heavy traffic for the control-path figure.
        tp.generate(input_ids=[prompts[0]] * 4, sampling_params={"max_new_tokens": 128, "ignore_eos": True})
        stats = tp.get_stats()
    print("TP=2 stats:", json.dumps({k: v for k, v in stats.items() if "overhead" in k}))
    for a, b in zip(base, outs, strict=True):
        assert a["output_ids"][0] == b["output_ids"][0]
        top_a = a["meta_info"]["output_top_logprobs"][0]
        top_b = b["meta_info"]["output_top_logprobs"][0]
        assert [v for v, _ in top_b] == pytest.approx([v for v, _ in top_a], abs=0.15)


def test_phase_times_cover_the_traced_span(llama_dir):
    """The step trace that ``bench roofline`` splits into prefill, decode and idle device time: the three add up to
    the span from the first step's start to the last step's end (steps run one after another on the stream)."""
    import sgl_ray
    from sgl_ray.runner.trace import phase_times

    with sgl_ray.Engine(llama_dir, dtype="bfloat16", skip_tokenizer_init=True, max_total_tokens=8192) as eng:
        runner = eng._core.runner
        runner.step_trace = []
        eng.generate(
            input_ids=_prompts(),
            sampling_params={"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True},
        )
        torch.cuda.synchronize()
        trace, runner.step_trace = runner.step_trace, None
    phases = phase_times(trace)
    span = trace[0].start.elapsed_time(trace[-1].end) / 1e3
    assert phases["prefill_s"] > 0 and phases["decode_s"] > 0 and phases["idle_s"] >= 0
    assert phases["prefill_s"] + phases["decode_s"] + phases["idle_s"] == pytest.approx(span, rel=0.05)
    assert sum(s.num_tokens == s.batch_size for s in trace) >= NEW - 2  # the decode steps


def test_step_profile_charges_add_up_to_the_step(llama_dir):
    """``bench step-profile`` on the decode graph: the kernels' charges and the idle gaps add up to the profiled
    window, and the GEMV shows up once per linear layer and step."""
    import sgl_ray
    from sgl_ray.bench.step_profile import profile_decode_step

    with sgl_ray.Engine(llama_dir, dtype="bfloat16", skip_tokenizer_init=True, max_total_tokens=8192) as eng:
        p = profile_decode_step(eng._core.runner, batch_size=1, context=300, replays=20, profiled=5)
    a = p.attribution
    assert a.shares, "the profiler saw no kernels in the graph replays"
    assert sum(s.charged_us for s in a.shares) + a.idle_us == pytest.approx(a.window_us, rel=1e-6)
    gemv = sum(s.count for s in a.shares if s.label.startswith("_gemv_kernel"))
    assert gemv == 5 * (4 * 4 + 1)  # QKV, O, gate/up, down per layer, and the LM head, per step
    assert 0 < p.floor_ms < p.step_ms
