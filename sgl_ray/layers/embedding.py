"""Vocabulary-parallel token embedding and LM head.

Rank r owns vocabulary rows ``[r * shard, (r + 1) * shard)`` with ``shard = ceil(vocab / world)``; the last shard is
padded with zero rows. The embedding all-reduces (each token's row lives on one rank); the LM head all-gathers the
logit shards and drops the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgl_ray.distributed import Communicator, SingleProcessCommunicator
from sgl_ray.layers.linear import linear


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

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] < self.vocab_size:
            raise ValueError(f"embedding shape mismatch: {tuple(loaded.shape)} for vocab {self.vocab_size}")
        rows = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp.world_size == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            local = input_ids - self.vocab_start
            outside = (local < 0) | (local >= self.shard_size)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out.masked_fill_(outside.unsqueeze(-1), 0.0)
            out = self.tp.all_reduce(out)
        return out if self.multiplier == 1.0 else out * self.multiplier


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; may share its weight with the embedding (tied)."""

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        logits = linear(hidden, self.weight)
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[:, : self.vocab_size]
