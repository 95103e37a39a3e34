"""Tensor-parallel linear layers that shard their own weights while loading.

Each parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``, so a model's ``load_weights`` only
maps checkpoint names to parameters; how a full checkpoint tensor is cut for this rank lives with the layer.

Shapes follow ``torch.nn.functional.linear``: ``weight`` is ``[out_features_on_this_rank, in_features_on_this_rank]``.
A quantized checkpoint piece (:class:`~sgl_ray.layers.quantization.QuantizedMatrix`) is cut the same way, rows
anywhere and columns on its blocks' boundaries, and makes ``weight`` a
:class:`~sgl_ray.layers.quantization.QuantizedWeight` (see :func:`~sgl_ray.layers.quantization.load_rows`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgl_ray.distributed import Communicator, SingleProcessCommunicator
from sgl_ray.layers.cuda_ops import cuda_ops
from sgl_ray.layers.quantization import QuantizedMatrix, QuantizedWeight, load_rows, narrow_columns


def linear(
    x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear``, except that what the Triton GEMV takes on CUDA (a single row: faster than cuBLAS at batch 1,
    and launched so that it streams its weights while the kernel before it finishes) goes there, and a quantized
    weight decodes inside its own product."""
    if isinstance(weight, QuantizedWeight):
        operands = weight.gemv_operands() if x.is_cuda else None
        if operands is not None and cuda_ops().gemv_supports(x, operands[0]):  # one row: FP8 per row, INT4
            return cuda_ops().gemv(x, operands[0], bias, **operands[1])
        return weight.linear(x, bias)
    if x.is_cuda and cuda_ops().gemv_supports(x, weight):
        return cuda_ops().gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: Communicator | None) -> None:
        super().__init__()
        self.tp = tp or SingleProcessCommunicator()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.weight.accepts_quantized = True  # type: ignore[attr-defined]
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        self._load_whole(param, loaded)

    def _load_whole(self, param: nn.Parameter, loaded: Loaded) -> None:
        if tuple(param.shape) != tuple(loaded.shape):
            raise ValueError(
                f"weight shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}"
            )
        load_rows(self, param, 0, loaded)


Loaded = torch.Tensor | QuantizedMatrix  # a checkpoint tensor as the loaders take it


class ReplicatedLinear(_Linear):
    """Every rank holds the whole weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(_Linear):
    """``Y = X A``, A split along its output dimension; each rank produces its slice of Y (no communication)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, tp: Communicator | None = None
    ):
        tp = tp or SingleProcessCommunicator()
        super().__init__(in_features, _divide(out_features, tp.world_size, "output size"), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        rows = param.shape[0]
        self._load_whole(param, loaded.narrow(0, self.tp.rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input stored as one matrix (e.g. MLP gate and up).

    Checkpoint tensors arrive one by one with ``shard_id`` = their index in ``output_sizes``.
    """

    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool = False, tp: Communicator | None = None
    ):
        super().__init__(in_features, sum(output_sizes), bias, tp)
        self.output_sizes = [_divide(s, self.tp.world_size, "output size") for s in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        if not isinstance(shard_id, int):
            raise ValueError("MergedColumnParallelLinear needs an integer shard_id")
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        load_rows(self, param, offset, loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q, K, V projections with grouped-query attention.

    Query heads are split evenly across ranks. With fewer KV heads than ranks, each KV head is replicated on
    ``world_size // num_kv_heads`` consecutive ranks, so rank r holds KV head ``r * num_kv_heads // world_size``.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: Communicator | None = None,
    ) -> None:
        tp = tp or SingleProcessCommunicator()
        world = tp.world_size
        self.num_heads = _divide(num_heads, world, "number of attention heads")
        if num_kv_heads >= world:
            self.num_kv_heads = _divide(num_kv_heads, world, "number of KV heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(world, num_kv_heads, "tensor-parallel size over KV heads")
        self.head_dim = head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * world
        super().__init__(hidden_size, out, bias, tp)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        rank = self.tp.rank
        if shard_id == "q":
            offset, size, start = 0, self.q_size, rank * self.q_size
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, start = self.kv_size, (rank // self.kv_replicas) * self.kv_size
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        load_rows(self, param, offset, loaded.narrow(0, start, size))


class RowParallelLinear(_Linear):
    """``Y = X A``, A split along its input dimension; partial products are summed across ranks.

    The bias is added once, after the all-reduce.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: Communicator | None = None,
        reduce_results: bool = True,
    ) -> None:
        tp = tp or SingleProcessCommunicator()
        super().__init__(_divide(in_features, tp.world_size, "input size"), out_features, bias, tp)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: replicated
            self._load_whole(param, loaded)
            return
        cols = param.shape[1]  # a quantized weight: only along its blocks
        self._load_whole(param, narrow_columns(loaded, self.tp.rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return linear(x, self.weight, self.bias)
        return self.reduce(linear(x, self.weight))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's product without the bias -> the layer's output (summed across ranks, bias added)."""
        out = self.tp.all_reduce(partial) if self.reduce_results else partial
        if self.bias is not None:
            out = out + self.bias
        return out


def store_weights_input_major(model: nn.Module) -> None:
    """Store every projection weight as ``[in, out]`` memory (the ``[out, in]`` parameter becomes a transposed
    view), so CPU GEMMs read it untransposed — 1.3–2.4× faster with MKL for small batches. Module code is
    unchanged (``F.linear`` receives the view). A tied LM head gets its own copy: the embedding lookup keeps the
    row-major table."""
    from sgl_ray.layers.embedding import ParallelLMHead, VocabParallelEmbedding

    embedding_weights = {
        id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding and hasattr(m, "weight")
    }
    for module in model.modules():
        if not isinstance(module, (_Linear, ParallelLMHead)) or isinstance(module.weight, QuantizedWeight):
            continue
        w = module.weight
        transposed = w.data.t().contiguous().t()
        if id(w) in embedding_weights:
            module.weight = nn.Parameter(transposed, requires_grad=False)
        else:
            w.data = transposed
