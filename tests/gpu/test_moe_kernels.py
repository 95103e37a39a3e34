"""The Triton MoE backend against the torch backend (run on the device: ``pytest -m gpu``; the ``check_*``
helpers also run on the CPU under Triton's interpreter: tests/unit/test_moe_triton_interpreter.py).

Every buffer the backend allocates starts poisoned (NaN, or a wrong-but-valid index), so a row a kernel forgets
to write, or a padding slot it forgets to fill, fails the comparison instead of reading a lucky zero.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import pytest
import torch

from sgl_ray.layers.moe.base import Activation, ExpertWeights, TopK
from sgl_ray.layers.moe.torch_backend import TorchMoEBackend
from sgl_ray.layers.moe.triton_configs import GemmConfig, GemvConfig, LaunchConfig, grouped, small

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}
TOL[torch.float32] = dict(atol=1e-4, rtol=1e-4)
SILU = Activation("silu")
SWIGLU = Activation("swigluoai", alpha=1.702, limit=1.5)  # a low limit, so the clamps bite on N(0, 1) inputs


class Case(NamedTuple):
    x: torch.Tensor  # [T, H]
    weights: ExpertWeights
    topk: TopK
    first_expert: int
    num_global: int


def make_case(
    device: str, dtype: torch.dtype, tokens: int, top_k: int, num_local: int, hidden: int = 128,
    inter: int = 96, activation: Activation = SILU, bias: bool = False, first_expert: int = 0,
    num_global: int | None = None, routing: str = "random", dropped: float = 0.0, seed: int = 0,
) -> Case:  # fmt: skip
    """Random inputs on the scale of a real layer (outputs ~N(0, 1/4)). ``routing``: ``random`` (distinct
    experts per token, uniform over the global range), ``one`` (every token picks the same k experts: all load
    on them, the rest get none), or ``local`` (only this rank's experts). ``dropped``: share of ids set to -1."""
    g = torch.Generator().manual_seed(seed)
    num_global = num_global or num_local
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(num_local, 2 * inter, hidden, generator=g) / math.sqrt(hidden)
    w2 = torch.randn(num_local, hidden, inter, generator=g) / math.sqrt(inter)
    b13 = torch.randn(num_local, 2 * inter, generator=g) * 0.5 if bias else None
    b2 = torch.randn(num_local, hidden, generator=g) * 0.5 if bias else None
    if routing == "one":
        ids = (first_expert + torch.randperm(num_local, generator=g)[:top_k]).repeat(tokens, 1)
    elif routing == "local":
        ids = first_expert + torch.rand(tokens, num_local, generator=g).argsort(dim=1)[:, :top_k]
    else:
        ids = torch.rand(tokens, num_global, generator=g).argsort(dim=1)[:, :top_k]
    ids = torch.where(torch.rand(tokens, top_k, generator=g) < dropped, -1, ids).to(torch.int32)
    route = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=1)

    def dev(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.to(device, dtype) if t is not None else None

    weights = ExpertWeights(dev(w13), dev(w2), dev(b13), dev(b2), activation)
    return Case(dev(x), weights, TopK(route.to(device), ids.to(device)), first_expert, num_global)


def poisoned_empty(*shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` that fills floats with NaN and integers with 1 (an index that is valid but wrong)."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan") if dtype.is_floating_point else 1)


def expected_counts(case: Case, mask: torch.Tensor | None) -> torch.Tensor:
    """One per pair with an id >= 0 of every counted token, local or not (-1 ids count nowhere)."""
    ids = case.topk.ids.long().cpu()
    keep = ids >= 0
    if mask is not None:
        keep &= mask.cpu()[:, None]
    return torch.bincount(ids[keep], minlength=case.num_global)


def check_case(case: Case, config: LaunchConfig | None = None, counted: str | None = "masked") -> None:
    """Triton (with ``config``, or the table's) against the torch backend; ``counted``: None (no counts),
    ``all`` or ``masked`` (every other token)."""
    from sgl_ray.layers.moe.triton_backend import TritonMoEBackend

    x, weights, topk, first, num_global = case
    device = x.device
    counts = mask = None
    if counted is not None:
        counts = torch.arange(num_global, dtype=torch.int64, device=device) * 100
        if counted == "masked":
            mask = torch.arange(x.shape[0], device=device) % 2 == 0
    ref_counts = counts.clone() if counts is not None else None
    start = counts.clone() if counts is not None else None
    out = TritonMoEBackend(config, empty=poisoned_empty).run_experts(x, weights, topk, first, counts, mask)
    ref = TorchMoEBackend().run_experts(x, weights, topk, first, ref_counts, mask)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **TOL[x.dtype])
    if counts is not None:
        torch.testing.assert_close((counts - start).cpu(), expected_counts(case, mask))
        torch.testing.assert_close(counts, ref_counts)


def check_sort_pairs(
    device: str, tokens: int, top_k: int, num_local: int, first: int, num_global: int, block_m: int
) -> None:
    """The align step's exact output: pairs grouped by local expert in pair order, each segment padded to
    ``block_m`` with the sentinel, the block owners, ``-1`` past the rows in use, and a bound that holds."""
    from sgl_ray.layers.moe.triton_align import sort_pairs

    case = make_case(device, torch.float32, tokens, top_k, num_local, 16, 16, first_expert=first,
                     num_global=num_global, dropped=0.1, seed=tokens)  # fmt: skip
    ids = case.topk.ids
    got = sort_pairs(ids, first, num_local, block_m, empty=poisoned_empty)
    flat, num_pairs = (ids.flatten().cpu() - first).tolist(), ids.numel()
    want_ids: list[int] = []
    want_blocks: list[int] = []
    for e in range(num_local):
        pairs = [p for p, local in enumerate(flat) if local == e]
        pad = -len(pairs) % block_m
        want_ids += pairs + [num_pairs] * pad
        want_blocks += [e] * ((len(pairs) + pad) // block_m)
    used = len(want_ids)
    assert len(want_blocks) <= got.max_blocks
    assert got.num_padded.cpu().tolist() == [used]
    assert got.sorted_ids[:used].cpu().tolist() == want_ids
    blocks = got.block_expert.cpu().tolist()
    assert blocks == want_blocks + [-1] * (got.max_blocks - len(want_blocks))


# Forced configurations, on tiles small enough for Triton's interpreter (block_k 16 is a dot's minimum).
TINY_SMALL = small(GemvConfig(4, 32, 1, 2), GemvConfig(8, 16, 1, 2, pairs=2))
TINY_TILE = GemmConfig(32, 16, 2, 4, 2)


def tiny_grouped(block_m: int = 16, atomic: bool = False) -> LaunchConfig:
    return grouped(block_m, TINY_TILE, GemmConfig(16, 32, 1, 4, 2), atomic)


def check_paths(device: str, dtype: torch.dtype) -> None:
    """Both paths on tiny shapes: each activation, with and without biases, an EP range with ids outside it and
    -1s, an expert taking every token, counts with a mask (the subset the interpreter runs)."""
    ep = dict(first_expert=4, num_global=12)
    cases = [
        (make_case(device, dtype, 3, 2, 4, 32, 48, SILU, **ep, dropped=0.2, seed=1), TINY_SMALL),
        (make_case(device, dtype, 2, 2, 4, 48, 32, SWIGLU, bias=True, seed=2), TINY_SMALL),
        (
            make_case(device, dtype, 5, 2, 4, 32, 48, SWIGLU, bias=True, **ep, dropped=0.2, seed=3),
            tiny_grouped(),
        ),
        (
            make_case(device, dtype, 9, 2, 4, 48, 32, SILU, routing="one", seed=4),
            tiny_grouped(16, atomic=True),
        ),
    ]
    for case, config in cases:
        check_case(case, config)


def check_residual_step(device: str, dtype: torch.dtype, config: LaunchConfig | None = None) -> None:
    """``run_experts_residual`` (one row; the norm's scale ``g`` folded into ``w13`` or passed to be applied; the
    norm's sums of squares by parts in) against the torch experts on ``g * rmsnorm(h)`` plus ``h``, and the sums of squares it writes
    against the result's. Biases, an EP range with -1 ids, both activations."""
    from sgl_ray.layers.moe.triton_backend import TritonMoEBackend
    from sgl_ray.layers.triton_gemv_epilogues import NormOfInput

    cases = [(SILU, False, {}, True), (SWIGLU, True, dict(first_expert=4, num_global=12), False)]
    for seed, (act, bias, ep, fold) in enumerate(cases):
        case = make_case(
            device, dtype, 1, 4, 4, hidden=96, inter=48, activation=act, bias=bias, seed=seed, **ep
        )
        h, weights, topk, first, _ = case
        g = torch.rand(h.shape[1], generator=torch.Generator().manual_seed(seed)).to(device) + 0.5
        folded = weights._replace(w13=(weights.w13.float() * g).to(dtype)) if fold else weights
        eps = 1e-6
        sq = h.float().pow(2)
        parts = torch.stack([sq[:, :40].sum(1), sq[:, 40:].sum(1)], dim=1).contiguous()  # any split will do
        backend = TritonMoEBackend(config, empty=poisoned_empty)
        assert backend.runs_residual(h, folded, 4)
        norm = NormOfInput(parts, eps, None if fold else g.to(dtype))  # the scale folded in, or applied
        out, sumsq = backend.run_experts_residual(h, norm, folded, topk, first)
        x = (h.float() * torch.rsqrt(sq.mean(1, keepdim=True) + eps) * g).to(dtype)
        ref = h.float() + TorchMoEBackend().run_experts(x, weights, topk, first).float()
        assert out.dtype == dtype and out.shape == h.shape
        torch.testing.assert_close(out.float(), ref, **TOL[dtype])
        assert sumsq.dtype == torch.float32 and sumsq.shape[0] == 1
        torch.testing.assert_close(sumsq.sum(1), out.float().pow(2).sum(1), atol=1e-3, rtol=1e-4)


DTYPES = [torch.bfloat16, torch.float32]
# T x k x E over the brief's grid (k <= E); activation, biases and an EP range rotate through the cases.
GRID = [(t, k, e) for t, k, e in itertools.product([1, 3, 64, 300], [1, 2, 8], [4, 8, 64]) if k <= e]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,top_k,num_local", GRID)
def test_matches_torch_backend(dtype: torch.dtype, tokens: int, top_k: int, num_local: int) -> None:
    i = GRID.index((tokens, top_k, num_local))
    act, bias = [(SILU, False), (SWIGLU, True), (SILU, True), (SWIGLU, False)][i % 4]
    ep = dict(first_expert=num_local, num_global=3 * num_local, dropped=0.1) if i % 3 == 1 else {}
    case = make_case("cuda", dtype, tokens, top_k, num_local, activation=act, bias=bias, seed=i, **ep)
    check_case(case, counted=["masked", None, "all"][i % 3])


CONFIGS = {
    "small": small(),
    "grouped16": grouped(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(64, 64, 1, 4, 3)),
    "grouped32-atomic": grouped(32, GemmConfig(64, 32, 8, 4, 3), GemmConfig(128, 64, 8, 4, 3), True),
    "grouped64": grouped(64, GemmConfig(128, 32, 8, 8, 3), GemmConfig(64, 64, 4, 4, 3)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("routing", ["random", "one", "local"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_path_on_uneven_shapes(name: str, routing: str, dtype: torch.dtype) -> None:
    """Each path at H, I that no tile divides, with an EP range: zero-token experts, every token on the same
    experts, -1 ids, counts."""
    for tokens, top_k, act in [(3, 8, SWIGLU), (70, 2, SILU)]:
        case = make_case(
            "cuda", dtype, tokens, top_k, 16, hidden=200, inter=72, activation=act, bias=tokens == 3,
            first_expert=16, num_global=48, routing=routing, dropped=0.1, seed=tokens,
        )  # fmt: skip
        check_case(case, CONFIGS[name])


@pytest.mark.parametrize(
    "tokens,top_k,num_local,first,num_global,block_m",
    [(1, 1, 4, 0, 4, 16), (3, 8, 64, 0, 64, 16), (300, 8, 64, 64, 256, 32), (2100, 8, 4, 4, 12, 64)],
)
def test_sort_pairs(
    tokens: int, top_k: int, num_local: int, first: int, num_global: int, block_m: int
) -> None:
    check_sort_pairs("cuda", tokens, top_k, num_local, first, num_global, block_m)


def test_paths_subset_on_cuda() -> None:
    check_paths("cuda", torch.float32)
    check_paths("cuda", torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_step(dtype: torch.dtype) -> None:
    check_residual_step("cuda", dtype)
    check_residual_step("cuda", dtype, small())  # the default launch shape (the table has tuned ones)


def test_no_tokens_and_fp16() -> None:
    check_case(make_case("cuda", torch.float16, 5, 2, 8, bias=True, seed=7))
    empty = make_case("cuda", torch.bfloat16, 0, 2, 8)
    check_case(empty)


@pytest.mark.parametrize("tokens", [2, 48])  # the small-batch and the grouped path
def test_cuda_graph_replay_with_new_routing(tokens: int) -> None:
    """Captured once, replayed on new inputs and routing: the right answer, and no host sync in an eager call,
    the capture or a replay (``set_sync_debug_mode('error')`` raises on one)."""
    from sgl_ray.layers.moe.triton_backend import TritonMoEBackend

    backend = TritonMoEBackend()
    first = make_case("cuda", torch.bfloat16, tokens, 8, 32, activation=SWIGLU, bias=True, seed=1)
    x, topk = first.x.clone(), TopK(first.topk.weights.clone(), first.topk.ids.clone())
    counts = torch.zeros(32, dtype=torch.int64, device="cuda")
    mask = torch.ones(tokens, dtype=torch.bool, device="cuda")
    backend.run_experts(x, first.weights, topk, 0, counts, mask)  # compiles
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with _no_host_sync():
        backend.run_experts(x, first.weights, topk, 0, counts, mask)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graph wants
            backend.run_experts(x, first.weights, topk, 0, counts, mask)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            out = backend.run_experts(x, first.weights, topk, 0, counts, mask)
    for seed in (2, 3):
        new = make_case("cuda", torch.bfloat16, tokens, 8, 32, seed=seed, dropped=0.2)
        x.copy_(new.x)
        topk.weights.copy_(new.topk.weights)
        topk.ids.copy_(new.topk.ids)
        mask.copy_(torch.arange(tokens, device="cuda") % seed == 0)
        counts.zero_()
        with _no_host_sync():
            graph.replay()
        case = Case(x, first.weights, topk, 0, 32)
        torch.testing.assert_close(out, TorchMoEBackend().run_experts(x, first.weights, topk), **TOL[x.dtype])
        torch.testing.assert_close(counts.cpu(), expected_counts(case, mask))


class _no_host_sync:
    def __enter__(self) -> None:
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode("default")
