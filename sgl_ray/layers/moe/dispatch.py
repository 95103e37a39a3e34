"""How an MoE block's tokens reach the experts of their shards and come back (``moe_a2a_backend``).

``none`` (:class:`ReplicatedTokens`, the default): after tensor-parallel attention every rank holds every token.
Each rank routes all of them, runs the pairs whose experts it holds (and its slice of the shared experts), and the
one all-reduce over the group sums the partial outputs — the bytes a dense MLP moves.

``all_to_all`` (:class:`AllToAllTokens`, ``ep_size == tp_size``): rank r routes slice r of the tokens
(``c = ceil(T / ep)`` rows, the last slice padded) and sends it, with its routing, to every expert rank; each
runs its experts over what it received and sends the weighted outputs back; each rank sums what came back for its
slice, adds its shared experts (whole, replicated) and an all-gather rebuilds ``[T, H]`` everywhere::

    slice [c, H] ─ all_to_all ─▶ [ep, c, H] from each source ─ experts ─▶ [ep, c, H]
                 ─ all_to_all ─▶ [ep, c, H] from each expert rank ─ sum ─▶ [c, H] ─ all_gather ─▶ [T, H]

The buffers have static shapes (a destination gets a row for every token of a slice; pairs of experts it does not
hold are skipped there), so nothing waits for the host and the exchange runs inside CUDA graphs. With
tensor-parallel attention this moves 1.5x the bytes of ``none`` (two all-to-alls and an all-gather of [T, H]
against one all-reduce), hence the default: it is the dispatch for layouts whose ranks hold different tokens.

Expert-load counts: under ``none`` the group's first rank counts every pair; under ``all_to_all`` each rank counts
its slice's pairs (the shard group adds the ranks' counts up).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sgl_ray.layers.moe.base import TopK

if TYPE_CHECKING:
    from sgl_ray.layers.moe.layer import SparseMoeBlock
    from sgl_ray.runner.forward_batch import ForwardBatch


class TokenDispatch(ABC):
    """Contract: ``run(block, x, batch)`` returns the block's output ``[T, H]`` for the replicated input ``x``,
    identical on every rank of the group; ``replicated_shared_experts`` says whether the shared experts hold
    whole weights on every rank (else a tensor-parallel slice)."""

    replicated_shared_experts = False

    @abstractmethod
    def counts_on(self, rank: int) -> bool:
        """Whether ``rank`` of the group records expert-load counts."""

    @abstractmethod
    def run(self, block: SparseMoeBlock, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor: ...


def real_rows(batch: ForwardBatch) -> torch.Tensor:
    """[T] bool: rows of real tokens (CUDA-graph padding rows write the reserved KV slot 0)."""
    return batch.out_cache_loc != 0


class ReplicatedTokens(TokenDispatch):
    def counts_on(self, rank: int) -> bool:
        return rank == 0

    def run(self, block: SparseMoeBlock, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        counts = block.expert_counts if block.counts_load else None
        topk = block.route(x, counts, batch.out_cache_loc)  # padding rows write slot 0: not counted
        out = block.run_experts(x, topk, batch)
        if block.shared_experts is not None:
            out = out + block.shared(x)
        tp = block.tp
        return tp.all_reduce(out) if tp.world_size > 1 else out


class AllToAllTokens(TokenDispatch):
    replicated_shared_experts = True

    def counts_on(self, rank: int) -> bool:
        return True

    def run(self, block: SparseMoeBlock, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        group, (t, h) = block.tp, x.shape
        ep, rank = group.world_size, group.rank
        c = -(-t // ep)
        rows = slice(rank * c, (rank + 1) * c)
        padded = F.pad(x, (0, 0, 0, ep * c - t))  # [ep * c, H]
        mine = padded[rows]  # [c, H]
        in_range = torch.arange(ep * c, device=x.device)[rows] < t  # the last slice's padding routes nowhere
        real = F.pad(real_rows(batch), (0, ep * c - t))[rows] & in_range
        topk = block.route(mine, block.expert_counts if block.counts_load else None, real)
        ids = topk.ids.masked_fill(~in_range[:, None], -1)  # [c, k]
        k = ids.shape[1]
        meta = torch.cat([ids.float(), topk.weights], dim=1)  # [c, 2k]: ids are exact in float32
        recv_x = group.all_to_all(mine.unsqueeze(0).expand(ep, c, h).contiguous())  # [ep, c, H]
        recv_meta = group.all_to_all(meta.unsqueeze(0).expand(ep, c, 2 * k).contiguous())
        routed = TopK(recv_meta[..., k:].reshape(-1, k), recv_meta[..., :k].reshape(-1, k).round().int())
        out = block.run_experts(recv_x.view(ep * c, h), routed, batch)  # [ep * c, H]
        back = group.all_to_all(out.view(ep, c, h))  # [ep, c, H]: row d from expert rank d
        y = back.float().sum(dim=0).to(x.dtype)  # [c, H]
        if block.shared_experts is not None:
            y = y + block.shared(mine)
        return group.all_gather(y, dim=0)[:t]


DISPATCHES: dict[str, type[TokenDispatch]] = {"none": ReplicatedTokens, "all_to_all": AllToAllTokens}
