"""The expert-kernel seam of an MoE layer: what one rank computes for the (token, expert) pairs routed to it.

A backend runs the gated experts this rank holds over a batch of tokens and combines their outputs with the
routing weights. Contract of :meth:`MoEBackend.run_experts`:

* ``topk.ids`` [T, k] are *global* expert ids; this rank holds experts ``[first_expert, first_expert + E)``
  (``E = weights.w13.shape[0]``) and skips every pair whose expert lies outside that range (expert parallelism:
  another rank computes it). Ids may also be ``-1`` (no expert), skipped the same way.
* For token t the result is ``sum_j topk.weights[t, j] * expert_{ids[t, j]}(x[t])`` over the pairs it computes
  (zero for a token with none), accumulated in float32 and returned in ``x.dtype``, ``[T, H]``.
* ``expert(x) = w2 @ act(w13 @ x + b13) + b2``: ``w13`` [E, 2I, H] holds the gate rows ``[0, I)`` then the up
  rows ``[I, 2I)``, ``w2`` [E, H, I]; the biases are optional (``b13`` [E, 2I], ``b2`` [E, H]). ``act`` is the
  layer's :class:`Activation` applied to ``(gate, up)``.
* ``counts`` (optional, int64 [num_global_experts]): add, for every token whose ``count_mask`` entry is true (every
  token when None), one per routed pair to the count of its expert, for *all* pairs (local or not). This is the
  expert-load statistic; backends may fold it into their routing pass.
* Nothing may synchronise with the host on CUDA (the call is captured in CUDA graphs) when
  ``supports_cuda_graph`` is true.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from sgl_ray.errors import InvalidRequestError


class TopK(NamedTuple):
    """The router's choice for each token: ``k`` experts and their combine weights."""

    weights: torch.Tensor  # [T, k] float32
    ids: torch.Tensor  # [T, k] int32 global expert ids


@dataclass(frozen=True)
class Activation:
    """How an expert's gate and up projections become its down projection's input.

    * ``silu``: ``silu(gate) * up`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek);
    * ``swigluoai``: ``g * sigmoid(alpha * g) * (u + 1)`` with ``g = min(gate, limit)`` and
      ``u = clamp(up, -limit, limit)`` (GPT-OSS).
    """

    kind: Literal["silu", "swigluoai"] = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "silu":
            return torch.nn.functional.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + 1)


class ExpertWeights(NamedTuple):
    """One layer's experts on this rank (see the module docstring for the layout)."""

    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]
    b13: torch.Tensor | None  # [E, 2I]
    b2: torch.Tensor | None  # [E, H]
    activation: Activation


class MoEBackend(ABC):
    supports_cuda_graph = False

    @abstractmethod
    def run_experts(
        self,
        x: torch.Tensor,
        weights: ExpertWeights,
        topk: TopK,
        first_expert: int = 0,
        counts: torch.Tensor | None = None,
        count_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def runs_residual(self, x: torch.Tensor, weights: ExpertWeights, top_k: int) -> bool:
        """Whether :meth:`run_experts_residual` takes a batch like ``x`` (the one-row steps of a model whose
        norm scales are folded into the projections, see ``LlamaDecoderLayer.forward_folded``)."""
        return False

    def run_experts_residual(
        self, h: torch.Tensor, norm: object, weights: ExpertWeights, topk: TopK, first_expert: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h + experts(rmsnorm(h)), sumsq)`` with the norm's scale folded into ``w13`` and ``norm`` a
        ``triton_gemv_epilogues.NormOfInput`` (the sums of squares of ``h`` by parts); ``sumsq`` the same of the
        result. Only where :meth:`runs_residual`."""
        raise NotImplementedError(f"{type(self).__name__} has no residual expert step")


_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("sgl_ray.layers.moe.torch_backend", "TorchMoEBackend"),
    "triton": ("sgl_ray.layers.moe.triton_backend", "TritonMoEBackend"),
}


def create_moe_backend(name: str | None, device: torch.device) -> MoEBackend:
    """The backend registered as ``name`` (``None`` or ``"auto"``: Triton on CUDA, torch elsewhere).

    Example::

        >>> type(create_moe_backend(None, torch.device("cpu"))).__name__
        'TorchMoEBackend'
    """
    if name in (None, "auto"):
        name = "triton" if torch.device(device).type == "cuda" else "torch"
    if name not in _BACKENDS:
        raise InvalidRequestError(
            f"moe_runner_backend: unknown backend {name!r} (have: auto, {', '.join(sorted(_BACKENDS))})",
            param="moe_runner_backend",
        )
    if name == "triton" and torch.device(device).type != "cuda":
        raise InvalidRequestError(
            "moe_runner_backend: 'triton' needs a CUDA device", param="moe_runner_backend"
        )
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)()


def count_experts(counts: torch.Tensor, ids: torch.Tensor, count_mask: torch.Tensor | None) -> None:
    """``counts[e] += #{(t, j): ids[t, j] == e and count_mask[t]}`` without a host sync (ids of -1 not counted)."""
    ones = (ids >= 0).to(counts.dtype)  # [T, k]
    if count_mask is not None:
        ones = ones * count_mask.to(counts.dtype)[:, None]
    counts.index_add_(0, ids.clamp(min=0).reshape(-1).long(), ones.reshape(-1))
