"""Vocabulary-parallel token embedding and LM head.

Rank r owns vocabulary rows ``[r * shard, (r + 1) * shard)`` with ``shard = ceil(vocab / world)``; the last shard is
padded with zero rows. The embedding all-reduces (each token's row lives on one rank); the LM head all-gathers the
logit shards and drops the padding.

A quantized table (:class:`~sgl_ray.layers.quantization.QuantizedWeight`) decodes only the looked-up rows; a head
tied to it multiplies by the same quantized table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgl_ray.distributed import Communicator, SingleProcessCommunicator
from sgl_ray.layers.linear import linear
from sgl_ray.layers.quantization import DenseRows, QuantizedMatrix, QuantizedWeight, load_rows


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, vocab_size: int, hidden_size: int, tp: Communicator | None = None, multiplier: float = 1.0
    ) -> None:
        """``multiplier``: a scale of the looked-up rows (Granite's ``embedding_multiplier``)."""
        super().__init__()
        self.tp = tp or SingleProcessCommunicator()
        self.multiplier = multiplier
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp.world_size)
        self.vocab_start = self.tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.weight.accepts_quantized = True  # type: ignore[attr-defined]
        self._tied_heads: list[ParallelLMHead] = []  # share this weight (see ParallelLMHead.tie)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor | QuantizedMatrix, shard_id: object = None
    ) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] < self.vocab_size:
            raise ValueError(f"embedding shape mismatch: {tuple(loaded.shape)} for vocab {self.vocab_size}")
        rows = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        load_rows(self, param, 0, loaded.narrow(0, self.vocab_start, rows))
        weight = self.weight
        if isinstance(weight, QuantizedWeight):
            if rows < self.shard_size:  # the last shard's padding
                weight.put(
                    rows, DenseRows(torch.zeros(self.shard_size - rows, weight.cols, dtype=weight.dtype))
                )
            for head in self._tied_heads:  # they held the dense parameter this replaced
                del head.weight
                head.weight = weight

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.embedding(ids)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp.world_size == 1:
            out = self._lookup(input_ids)
        else:
            local = input_ids - self.vocab_start
            outside = (local < 0) | (local >= self.shard_size)
            out = self._lookup(local.masked_fill(outside, 0))
            out.masked_fill_(outside.unsqueeze(-1), 0.0)
            out = self.tp.all_reduce(out)
        return out if self.multiplier == 1.0 else out * self.multiplier


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; may share its weight with the embedding (tied)."""

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        embedding._tied_heads.append(self)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        logits = linear(hidden, self.weight)
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[:, : self.vocab_size]
