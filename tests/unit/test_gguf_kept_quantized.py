"""GGUF weights kept quantized (``quantization="gguf"``): every block format's product equals dequantize-then-matmul
(the decoded values bit for bit, the product up to summation order), and the layers that hold such weights — fused
projections of mixed pieces, tensor-parallel shards, embeddings and tied heads, LoRA wrappers — compute what their
dense twins loaded from the reference's float values compute.

Blocks come from the ``gguf`` package's quantizers where it has one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), else (K-quants)
random bytes with finite scales, decoded by its reference dequantizer; real tensors come from the default model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize
from torch import nn

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.errors import InvalidRequestError, UnsupportedModelError
from sgl_ray.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from sgl_ray.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    linear,
)
from sgl_ray.layers.quantization import GGUFMatrix, QuantizedWeight
from sgl_ray.layers.quantization import weight as weight_module
from sgl_ray.layers.quantization.gguf_formats import FORMATS
from sgl_ray.model_loader.gguf import iter_gguf_weights
from sgl_ray.models.loading import load_stacked_weights

from .ranks import RankOf

Q = GGMLQuantizationType
ROWS, COLS = 24, 512
_HALF_SCALES = ("d", "m", "dmin")


def blocks_of(qtype: GGMLQuantizationType, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> np.ndarray:
    """uint8 ``[rows, row bytes]`` blocks of ``qtype``, as a GGUF file stores them."""
    rng = np.random.default_rng(seed)
    try:
        return quantize(rng.normal(0, 0.5, size=(rows, cols)).astype(np.float32), qtype)
    except NotImplementedError:  # no quantizer (K-quants): random blocks with finite float16 scales
        block, size = GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
        start = 0
        for name, width in FORMATS[qtype].fields:
            if name in _HALF_SCALES:
                scale = rng.normal(0, 0.02, size=(len(data), 1)).astype(np.float16)
                data[:, start : start + 2] = scale.view(np.uint8)
            start += width
        return data.reshape(rows, -1)


def matrix_and_reference(qtype: GGMLQuantizationType, rows: int = ROWS, cols: int = COLS, seed: int = 0):
    raw = blocks_of(qtype, rows, cols, seed)
    reference = torch.from_numpy(reference_dequantize(raw, qtype).reshape(rows, cols))
    return GGUFMatrix.from_blocks(torch.from_numpy(raw), qtype), reference, raw


def assert_product_close(
    got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
):
    """``got`` is ``F.linear(x, w, bias)`` up to float32 summation order (bounded by the sum of |terms|)."""
    want = F.linear(x, w, bias)
    scale = F.linear(x.abs(), w.abs()).max().item() + 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("qtype", sorted(FORMATS, key=lambda q: q.name), ids=lambda q: q.name)
def test_format_product_equals_dequantize_then_matmul(qtype, monkeypatch):
    monkeypatch.setattr(weight_module, "SLAB_VALUES", 5 * COLS)  # five rows a slab: the last slab is short
    m, reference, raw = matrix_and_reference(qtype)
    assert torch.equal(m.to_blocks(), torch.from_numpy(raw)) and m.nbytes == raw.nbytes  # the file's bytes
    assert torch.equal(m.dequantize().view(torch.int32), reference.view(torch.int32))  # bit for bit
    weight = QuantizedWeight(ROWS, COLS, torch.float32, torch.device("cpu"))
    weight.put(0, m)
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 7):
        x = torch.randn(tokens, COLS, generator=gen)
        bias = torch.randn(ROWS, generator=gen)
        assert_product_close(linear(x, weight, bias), x, reference, bias)
    index = torch.tensor([3, 0, 3, ROWS - 1])
    assert torch.equal(weight.embedding(index), reference[index])


def test_default_model_tensors_kept_as_stored(smollm2_path):
    """A real layer's Q4_1 tensors (Q/K rows un-permuted as blocks) decode to the dequantized stream's values (the
    Q8_0 embedding: ``test_gguf_quants.py`` decodes every tensor of the file with these decoders)."""
    wanted = lambda name: ".layers.0." in name  # noqa: E731
    dense = dict(iter_gguf_weights(Path(smollm2_path), wanted))
    kept = dict(iter_gguf_weights(Path(smollm2_path), wanted, keep_quantized=True))
    assert kept.keys() == dense.keys()
    kinds = set()
    for name, tensor in kept.items():
        if isinstance(tensor, GGUFMatrix):
            kinds.add(tensor.kind)
            assert torch.equal(tensor.dequantize(), dense[name]), name
        else:
            assert tensor.dim() == 1 and torch.equal(tensor, dense[name]), name  # norms stay float
    assert kinds == {"Q4_1"}
    q = kept["model.layers.0.self_attn.q_proj.weight"]
    x = torch.randn(3, q.shape[1])
    weight = QuantizedWeight(*q.shape, torch.float32, torch.device("cpu"))
    weight.put(0, q)
    assert_product_close(linear(x, weight), x, dense["model.layers.0.self_attn.q_proj.weight"])


def _load(layer: nn.Module, pieces) -> None:
    """Load ``(piece, shard_id)`` into ``layer.weight`` as ``load_stacked_weights`` does: the parameter is looked
    up once, before any piece arrives."""
    param = layer.weight
    for value, shard_id in pieces:
        param.weight_loader(param, value, shard_id)


def test_fused_projection_of_mixed_pieces():
    """q and k (Q4_K) share a segment, v (Q6_K) has its own; a gate/up whose up arrives dense (F32) first keeps
    those rows as dense rows when the quantized gate arrives."""
    qkv_args = dict(hidden_size=COLS, head_dim=16, num_heads=4, num_kv_heads=2)
    q, q_ref, _ = matrix_and_reference(Q.Q4_K, 64, COLS, seed=1)
    k, k_ref, _ = matrix_and_reference(Q.Q4_K, 32, COLS, seed=2)
    v, v_ref, _ = matrix_and_reference(Q.Q6_K, 32, COLS, seed=3)
    quantized, dense = QKVParallelLinear(**qkv_args), QKVParallelLinear(**qkv_args)
    _load(quantized, [(v, "v"), (q, "q"), (k, "k")])
    _load(dense, [(q_ref, "q"), (k_ref, "k"), (v_ref, "v")])
    assert isinstance(quantized.weight, QuantizedWeight) and quantized.weight.kinds == ["Q4_K", "Q6_K"]
    x = torch.randn(5, COLS)
    assert_product_close(quantized(x), x, dense.weight)

    gate, gate_ref, _ = matrix_and_reference(Q.Q8_0, 16, COLS, seed=4)
    up_ref = torch.randn(16, COLS)
    quantized, dense = MergedColumnParallelLinear(COLS, [16, 16]), MergedColumnParallelLinear(COLS, [16, 16])
    _load(quantized, [(up_ref, 1), (gate, 0)])
    _load(dense, [(gate_ref, 0), (up_ref, 1)])
    assert quantized.weight.kinds == ["Q8_0", "dense"]
    assert_product_close(quantized(x), x, dense.weight)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q4_1], ids=lambda q: q.name)
def test_tensor_parallel_shards_along_blocks(qtype):
    m, reference, _ = matrix_and_reference(qtype)
    x = torch.randn(3, COLS)
    for rank in range(2):
        column = ColumnParallelLinear(COLS, ROWS, tp=RankOf(rank, 2))
        column.weight_loader(column.weight, m)
        rows = reference[rank * ROWS // 2 : (rank + 1) * ROWS // 2]
        assert_product_close(column(x), x, rows)
        row = RowParallelLinear(COLS, ROWS, tp=RankOf(rank, 2))  # 256 columns a rank: whole K-quant blocks
        row.weight_loader(row.weight, m)
        cols = slice(rank * COLS // 2, (rank + 1) * COLS // 2)
        assert_product_close(linear(x[:, cols], row.weight), x[:, cols], reference[:, cols])


def test_tensor_parallel_split_inside_a_block_names_the_option():
    m, _, _ = matrix_and_reference(Q.Q4_K)
    row = RowParallelLinear(COLS, ROWS, tp=RankOf(1, 4))  # 128 columns a rank: half a 256-value block
    with pytest.raises(UnsupportedModelError, match="quantization='none'"):
        row.weight_loader(row.weight, m)


def test_embedding_lookup_and_tied_head():
    m, reference, _ = matrix_and_reference(Q.Q8_0, rows=9, cols=64)
    embedding, head = VocabParallelEmbedding(9, 64), ParallelLMHead(9, 64)
    head.tie(embedding)
    embedding.weight_loader(embedding.weight, m)
    assert isinstance(embedding.weight, QuantizedWeight) and head.weight is embedding.weight
    ids = torch.tensor([8, 0, 4, 4])
    assert torch.equal(embedding(ids), reference[ids])
    h = torch.randn(2, 64)
    assert_product_close(head(h), h, reference)
    # the second of two vocabulary shards: rows 5..8 and one zero row of padding
    shard = VocabParallelEmbedding(9, 64, tp=RankOf(1, 2))
    shard.weight_loader(shard.weight, m)
    assert torch.equal(shard.weight.dequantize(), torch.cat([reference[5:], torch.zeros(1, 64)]))


def test_lora_adds_to_the_quantized_base_product():
    from sgl_ray.lora.backend import LoRABatch, create_lora_backend
    from sgl_ray.lora.layers import ColumnLoRALinear, LoRAContext, RowLoRALinear

    ctx = LoRAContext(create_lora_backend("torch", torch.device("cpu")))
    m, reference, _ = matrix_and_reference(Q.Q4_0, rows=COLS, cols=COLS)
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, COLS, generator=gen), torch.randn(COLS, 4, generator=gen)
    x = torch.randn(3, COLS, generator=gen)
    ctx.batch = LoRABatch(np.array([0]), np.array([3]), np.array([0]), torch.device("cpu"))
    for cls, wrapper_cls, module in (
        (ReplicatedLinear, ColumnLoRALinear, "q_proj"),
        (RowParallelLinear, RowLoRALinear, "o_proj"),
    ):
        outs, bases = [], []
        for weight in (m, reference):
            base = cls(COLS, COLS, False, None)
            base.weight_loader(base.weight, weight)
            wrapper = wrapper_cls(base, {module: None}, ctx, num_slots=1, max_rank=4)
            wrapper.load_slot(0, module, a, b)
            outs.append(wrapper(x))
            bases.append(base)
        assert isinstance(bases[0].weight, QuantizedWeight) and isinstance(bases[1].weight, nn.Parameter)
        assert_product_close(outs[0], x, reference + b @ a)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-3)


def test_loader_gives_plain_parameters_float_values():
    """A quantized checkpoint tensor for a parameter without ``accepts_quantized`` (a router) arrives dequantized."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Parameter(torch.empty(ROWS, COLS), requires_grad=False)
            self.proj = ReplicatedLinear(COLS, ROWS, False, None)

    m, reference, _ = matrix_and_reference(Q.Q8_0)
    block = Block()
    load_stacked_weights(block, [("router", m), ("proj.weight", m)], ())
    assert torch.equal(block.router, reference)
    assert isinstance(block.proj.weight, QuantizedWeight)
    assert weight_module.weight_nbytes(block) == reference.nbytes + m.nbytes


def test_quantization_option():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(InvalidRequestError, match="quantization"):
        EngineArgs(quantization="q4")
    assert EngineArgs(quantization="gguf").effective_quantization(cpu, "gguf") == "gguf"
    assert EngineArgs(quantization="none").effective_quantization(cpu, "gguf") is None
    assert EngineArgs().effective_quantization(cpu, "safetensors") is None
    assert EngineArgs().effective_quantization(cuda, "gguf") is None
    assert EngineArgs().effective_quantization(cpu, "gguf") == ("gguf" if _default_keeps() else None)
    for device, fmt in ((cpu, "safetensors"), (cuda, "gguf")):
        with pytest.raises(UnsupportedModelError, match="quantization"):
            EngineArgs(quantization="gguf").effective_quantization(device, fmt)
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args(["--quantization", "gguf"])).quantization == "gguf"


def _default_keeps() -> bool:
    from sgl_ray.configs import engine_args

    return engine_args.GGUF_KEPT_QUANTIZED_BY_DEFAULT
