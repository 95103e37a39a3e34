"""EAGLE and EAGLE-3 heads in the in-process engine: tiny random-weight heads saved in the EAGLE checkpoint layouts
(``eagle_heads``) over the tiny random-weight targets. Greedy (and seeded) outputs are token-identical to decoding
without speculation — concurrent batches, tiny prefill chunks with preemption, prefix-cache hits — and the KV pool
is back where it started after every test. A head built to reproduce a one-layer target gets most drafts accepted
(the strongest check that the head's rows, KV and hidden states stay aligned with the target's tokens); loading
errors are typed."""

from __future__ import annotations

import random

import pytest
import torch

import sgl_ray
from sgl_ray.errors import InvalidRequestError, ModelLoadError

from ..conftest import _TINY_SHAPE
from .eagle_heads import ReferenceHead, copy_head_of, copy_target, record_drafts, save_eagle_head
from .test_spec_engine import assert_pool_restored, constrained_params

K = 3
GREEDY = {"temperature": 0.0, "max_new_tokens": 20, "ignore_eos": True}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(rng.randrange(4, 50))] for _ in range(n)]


def _own_vocab_weights(seed: int) -> dict[str, torch.Tensor]:
    """An embedding and an LM head of the head's own (EAGLE-1 repositories ship a copy of the target's; with
    and without the ``model.`` prefix)."""
    g = torch.Generator().manual_seed(seed)
    shape = (_TINY_SHAPE["vocab_size"], _TINY_SHAPE["hidden_size"])  # the tiny Llama's
    return {
        "model.embed_tokens.weight": torch.randn(shape, generator=g),
        "lm_head.weight": torch.randn(shape, generator=g) * 0.2,
    }


@pytest.fixture(scope="module")
def heads(tiny_llama_path, smollm2_path, tmp_path_factory):
    """name -> (target, head options): random EAGLE-1 heads over the tiny Llama (one sharing the target's
    embedding and LM head, one with its own), a random EAGLE-3 head (a 1,000-token draft vocabulary, reading the
    inputs of layers 0, 1 and the stream after layer 1), and the copy head over its one-layer target."""
    d = tmp_path_factory.mktemp("eagle")
    copy_tgt = copy_target(d / "copy_target", smollm2_path)
    made = {
        "eagle": (tiny_llama_path, "EAGLE", save_eagle_head(d / "e1", tiny_llama_path, "EAGLE", seed=1)),
        "eagle_own": (
            tiny_llama_path,
            "EAGLE",
            save_eagle_head(d / "e1_own", tiny_llama_path, "EAGLE", seed=3, weights=_own_vocab_weights(3)),
        ),
        "eagle3": (
            tiny_llama_path,
            "EAGLE3",
            save_eagle_head(
                d / "e3", tiny_llama_path, "EAGLE3", seed=2, draft_vocab=1000, aux_ids=[-1, 0, 1]
            ),
        ),
        "copy": (copy_tgt, "EAGLE", copy_head_of(d / "copy_head", copy_tgt)),
    }
    return {
        name: (
            target,
            dict(speculative_algorithm=algo, speculative_draft_model_path=head, speculative_num_steps=K),
        )
        for name, (target, algo, head) in made.items()
    }


class Engines:
    def __init__(self, heads: dict) -> None:
        self.heads = heads
        self._engines: dict[tuple, sgl_ray.Engine] = {}

    def get(self, name: str, spec: bool = True, **options) -> sgl_ray.Engine:
        key = (name, spec, tuple(sorted(options.items())))
        if key not in self._engines:
            target, head = self.heads[name]
            extra = head if spec else {}
            self._engines[key] = sgl_ray.Engine(target, **{"max_total_tokens": 4096, **options, **extra})
        return self._engines[key]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.shutdown()


@pytest.fixture(scope="module")
def engines(heads):
    e = Engines(heads)
    yield e
    e.close()


def _spec_counts(outs: list[dict]) -> tuple[int, int, int]:
    metas = [o["meta_info"] for o in outs]
    return (
        sum(m["spec_verify_ct"] for m in metas),
        sum(m["spec_proposed_drafts"] for m in metas),
        sum(m["spec_accepted_drafts"] for m in metas),
    )


@pytest.mark.parametrize("name", ["eagle", "eagle3", "copy"])
def test_greedy_outputs_identical(engines, name):
    prompts = _prompts(6)
    want = engines.get(name, spec=False).generate(input_ids=prompts, sampling_params=GREEDY)
    engine = engines.get(name)
    got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    verify_ct, proposed, accepted = _spec_counts(got)
    assert verify_ct > 0 and proposed > 0
    if name == "copy":
        assert accepted > proposed // 2
    assert_pool_restored(engine)


@pytest.mark.parametrize("name", ["eagle", "eagle_own", "eagle3"])
def test_drafts_match_reference(engines, name):
    """Every chain the engine's head drafts (read off its verify steps) is the one a head built from
    transformers' Llama modules over the same target and head checkpoints drafts after the same tokens: the
    loader's names, the rows' alignment with the target's tokens and hidden states (EAGLE-3: the captured layer
    inputs, the reduced vocabulary's d2t) and the head's KV across steps all agree with the reference."""
    target, head = engines.heads[name]
    capture = (0, 1, 2) if name == "eagle3" else ()  # the fixture's aux ids -1, 0, 1, plus one
    reference = ReferenceHead(
        target, head["speculative_draft_model_path"], head["speculative_algorithm"], capture
    )
    prompt = _prompts(1, seed=7)[0]
    seq, seen = record_drafts(engines.get(name), prompt, {**GREEDY, "max_new_tokens": 12})
    assert len(seen) >= 3
    for position, drafts in seen:
        assert drafts == reference.drafts(seq[: position + 1], len(drafts)), position


def test_copy_head_accept_length(engines):
    """The head that reproduces the one-layer target (up to its first token) keeps most drafts: more than two
    tokens per verify step of the four possible."""
    engine = engines.get("copy")
    before = engine.get_stats()
    engine.generate(input_ids=_prompts(4, seed=1), sampling_params={**GREEDY, "max_new_tokens": 33})
    after = engine.get_stats()
    steps = after["spec_verify_steps"] - before["spec_verify_steps"]
    emitted = after["spec_emitted_tokens"] - before["spec_emitted_tokens"]
    assert emitted / steps > 2.0, (emitted, steps)
    assert_pool_restored(engine)


@pytest.mark.parametrize(("name", "page_size", "pool"), [("copy", 1, 80), ("eagle3", 4, 96)])
def test_chunked_prefill_and_preemption(engines, name, page_size, pool):
    """Prefill chunks of 8 tokens (the head's rows of a chunk run at the next step) and a pool too small for the
    batch: requests are preempted, resumed from a prefix-cache hit, and their head rows recomputed."""
    prompts = _prompts(8, seed=3)
    want = engines.get(name, spec=False).generate(input_ids=prompts, sampling_params=GREEDY)
    engine = engines.get(name, max_total_tokens=pool, chunked_prefill_size=8, page_size=page_size)
    got = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert engine.get_stats()["num_preemptions"] > 0
    if name == "copy":
        _, proposed, accepted = _spec_counts(got)
        assert accepted > proposed // 2
    assert_pool_restored(engine)


def test_prefix_cache_hit(engines):
    """A prompt that extends a cached one: the head rebuilds its rows over the cached prefix and drafts as well as
    without the cache."""
    plain, engine = engines.get("copy", spec=False), engines.get("copy")
    first = _prompts(1, seed=2)[0]
    second = first + [123, 456, 789]
    engine.generate(input_ids=first, sampling_params=GREEDY)
    got = engine.generate(input_ids=second, sampling_params=GREEDY)
    assert got["output_ids"] == plain.generate(input_ids=second, sampling_params=GREEDY)["output_ids"]
    assert got["meta_info"]["cached_tokens"] >= len(first) - 1
    assert engine.flush_cache()
    cold = engine.generate(input_ids=second, sampling_params=GREEDY)
    assert got["meta_info"]["spec_accepted_drafts"] == cold["meta_info"]["spec_accepted_drafts"]
    assert_pool_restored(engine)


def test_seeded_sampling_identical(engines):
    """The head's drafts are deterministic, so a seeded request samples the same tokens as without speculation."""
    prompts = _prompts(3, seed=5)
    sampled = {"temperature": 0.8, "top_k": 40, "max_new_tokens": 16, "ignore_eos": True, "seed": 11}
    want = engines.get("copy", spec=False).generate(input_ids=prompts, sampling_params=sampled)
    got = engines.get("copy").generate(input_ids=prompts, sampling_params=sampled)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert _spec_counts(got)[2] > 0


@pytest.mark.parametrize("name", ["copy", "eagle3"])
def test_constrained_outputs_identical(engines, name):
    """Under a grammar the head still drafts; each verify row samples under the grammar's mask after the drafts
    before it (built once the runner answers with the drafts). The copy head's drafts mostly hold where the
    grammar allows them."""
    prompts = _prompts(4, seed=12)
    params = constrained_params(20)
    want = engines.get(name, spec=False).generate(input_ids=prompts, sampling_params=params)
    engine = engines.get(name)
    got = engine.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in got)
    if name == "copy":
        meta = got[1]["meta_info"]
        assert meta["spec_accepted_drafts"] > meta["spec_proposed_drafts"] // 3
    assert_pool_restored(engine)


def test_loading_errors(tiny_llama_path, tmp_path):
    """A head missing a tensor, one for another vocabulary and an EAGLE-3 head without its d2t map are typed
    errors at start."""
    cases = [
        (
            save_eagle_head(tmp_path / "no_fc", tiny_llama_path, "EAGLE", drop=("fc.weight",)),
            "EAGLE",
            ModelLoadError,
        ),
        (
            save_eagle_head(tmp_path / "no_d2t", tiny_llama_path, "EAGLE3", draft_vocab=100, drop=("d2t",)),
            "EAGLE3",
            ModelLoadError,
        ),
    ]
    other = save_eagle_head(tmp_path / "vocab", tiny_llama_path, "EAGLE")
    cfg = (
        (tmp_path / "vocab" / "config.json").read_text().replace('"vocab_size": 49152', '"vocab_size": 1000')
    )
    (tmp_path / "vocab" / "config.json").write_text(cfg)
    cases.append((other, "EAGLE", InvalidRequestError))
    for path, algo, error in cases:
        with pytest.raises(error, match="fc.weight|d2t|vocabulary"):
            sgl_ray.Engine(
                tiny_llama_path,
                max_total_tokens=512,
                speculative_algorithm=algo,
                speculative_draft_model_path=path,
            )


def test_eagle3_capture_layers():
    """Which target layer inputs EAGLE-3 reads: SGLang's defaults (2, L/2, L-3), else the checkpoint's layer ids
    plus one (the output of layer i is the input of layer i + 1)."""
    from types import SimpleNamespace

    from sgl_ray.models.llama_eagle import eagle3_capture_layers

    assert eagle3_capture_layers(SimpleNamespace(), 30) == (2, 15, 27)
    ids = SimpleNamespace(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 15, 28]})
    assert eagle3_capture_layers(ids, 30) == (2, 16, 29)
    with pytest.raises(ModelLoadError, match="eagle_aux_hidden_state_layer_ids"):
        eagle3_capture_layers(SimpleNamespace(), 2)  # the defaults need at least 4 layers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_states_on_cuda(heads):
    """On CUDA (bf16; one-row decode steps take the folded-norm layer step where its kernels apply): the EAGLE-3
    head's input captured from each target step (``fc`` over three layer inputs) is transformers' fp32
    reference, row by row. With tree drafts a request asking for top logprobs does not speculate, so its decode
    steps are one-row steps."""
    target, head = heads["eagle3"]
    reference = ReferenceHead(target, head["speculative_draft_model_path"], "EAGLE3", (0, 1, 2))
    tree = {**head, "speculative_eagle_topk": 2}
    with sgl_ray.Engine(target, device="cuda", max_total_tokens=4096, **tree) as engine:
        draft = engine._core.runner.spec.draft
        rows: dict[int, torch.Tensor] = {}
        real = draft.capture

        def recording(batch, hidden):  # the real capture, its stored rows noted by position
            positions = batch.positions.cpu().tolist()
            slots = batch.out_cache_loc.clone()
            real(batch, hidden)
            for p, row in zip(positions, draft.hidden_pool[slots].float().cpu(), strict=True):
                rows[p] = row

        draft.capture = recording
        prompt = _prompts(1, seed=9)[0]
        params = {**GREEDY, "max_new_tokens": 10}
        out = engine.generate(
            input_ids=prompt, sampling_params=params, return_logprob=True, top_logprobs_num=1
        )
        assert out["meta_info"]["spec_verify_ct"] == 0
    seq = prompt + out["output_ids"]
    with torch.no_grad():
        want = reference.features(seq[:-1])  # [n, H] positions 0 .. n-1
    got = torch.stack([rows[p] for p in range(len(seq) - 1)])
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert err.max() < 0.05, err
