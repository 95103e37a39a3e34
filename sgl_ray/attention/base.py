"""The attention-backend seam.

A backend computes attention for one layer of a batch whose requests each add ``extend_len`` new tokens on top of
``prefix_len`` tokens already in the paged KV pool (decode is ``extend_len == 1``; a batch may mix both). Contract:

* ``init_forward_metadata(batch)`` is called once per step before the model runs; it may precompute index
  tensors from ``batch`` (``req_to_token`` rows, seq lens) and store them on ``batch.attn_metadata``.
* ``graph_metadata(batch, max_seq_len)`` (backends with ``supports_cuda_graph``) replaces the first call for
  decode batches replayed from a CUDA graph (one graph per batch size and entry of ``graph_seq_lens``);
  ``prepare_graph_replay(metadata, seq_lens)`` runs before each replay
  (host-side planning; nothing for backends whose kernels read everything from the graph's buffers).
* ``forward(q, k, v, layer, batch, kv_stored)`` first stores the new tokens' ``k``/``v`` at
  ``batch.out_cache_loc`` in the pool (unless ``kv_stored``: a fused kernel did it already), then returns attention
  output ``[num_tokens, num_heads * head_dim]`` where token ``i`` of request ``r`` attends to request ``r``'s
  tokens ``0 .. prefix_len[r] + i`` (causal over new tokens, full over the prefix) — only the last
  ``layer.sliding_window`` of them where that is set, with ``layer.sinks`` (one logit per query head) in the
  softmax's denominator where those are set, and the scores soft-capped (``layer.logit_cap``) where that is set.
  A backend that cannot do one of them raises ``UnsupportedModelError`` in the forward of the first layer that
  needs it.
* The pool may hold FP8 values (``kv_pool.is_fp8``, ``kv_cache_dtype``): the store quantizes (``KVPool.set_kv``),
  and a read means the stored key times ``kv_pool.scales[layer_id].k`` and value times ``.v``. Every key and value
  a query sees is the pool's, this step's new tokens' too, so a token's attention does not depend on whether its
  prefix was computed in this step, an earlier one, or came from the prefix cache. ``check_kv_cache_dtype(dtype)`` is
  called once at start and raises ``UnsupportedModelError`` (``param="kv_cache_dtype"``) for a pool the backend
  cannot read here.
* ``batch.tree_mask`` (speculative tree verification; backends with ``supports_tree_mask``): an extend request
  ``r`` with ``offsets[r] >= 0`` has new token ``i`` see new token ``j`` iff ``mask[offsets[r] + i * n + j]``
  (``n``: its extend length; the draft tree's ancestors-or-self) instead of iff ``j <= i``, its whole prefix as
  usual. Such a token sits at position ``prefix_len[r] + depth(i)`` (``depth``: its count of ancestors-or-self
  less one; :func:`new_token_positions`), and a sliding window compares positions as for causal tokens: with
  window ``W`` it sees prefix key ``j`` iff ``j > prefix_len[r] + depth(i) - W`` and new token ``j`` iff the mask
  says so and ``depth(j) > depth(i) - W``.
* ``batch.multimodal.image_spans`` (models whose image tokens attend to each other in both directions, Gemma 3;
  backends with ``supports_image_spans``): per request, the ``[start, end)`` positions of the images its new
  tokens reach, each image whole within the step (prefill chunks end at image edges) or begun in the cached
  prefix. A new token at position ``i`` inside an image sees keys ``j < max(i + 1, end)``: the whole image, its
  later tokens too; a sliding window still bounds ``j > i - window`` (transformers' ``AND(window, OR(causal,
  same image))``). :func:`image_key_ends` gives those ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from sgl_ray.layers.attention import RadixAttention
    from sgl_ray.runner.forward_batch import ForwardBatch


class TreeMask(NamedTuple):
    """Which of its own new tokens each new token of a request sees (see the module note)."""

    mask: torch.Tensor  # [sum of n_r * n_r] bool, each tree request's [n_r, n_r] block row-major
    offsets: np.ndarray  # [B] int64 start of each request's block in ``mask``; -1: causal


def image_key_ends(batch: ForwardBatch, r: int, prefix: int, seq_len: int) -> np.ndarray | None:
    """[n] int64: the end (exclusive) of the keys each new token of request ``r`` (positions ``prefix ..
    seq_len``) sees under ``batch.multimodal.image_spans`` (see the module note): its image's end for a token
    inside an image, else its position + 1 (causal). None when no new token of ``r`` is inside an image.

    Example::

        >>> from types import SimpleNamespace
        >>> batch = SimpleNamespace(multimodal=SimpleNamespace(image_spans=(np.array([[3, 6]]),)))
        >>> image_key_ends(batch, 0, 2, 8).tolist()  # positions 2 .. 7; the image is 3, 4, 5
        [3, 6, 6, 6, 7, 8]
    """
    spans = getattr(batch.multimodal, "image_spans", None)
    if spans is None or spans[r] is None:
        return None
    ends = np.arange(prefix + 1, seq_len + 1)
    for start, end in spans[r]:
        lo, hi = max(int(start), prefix), min(int(end), seq_len)
        if lo < hi:
            ends[lo - prefix : hi - prefix] = hi
    return ends


def new_token_positions(batch: ForwardBatch) -> torch.Tensor:
    """[T] int64 on the batch's device: each new token's position among its request's new tokens — its index, or,
    in a draft tree (``batch.tree_mask``), its depth: the row sum of its mask row less one (the tree's
    ancestors-or-self).

    Example::

        >>> from types import SimpleNamespace
        >>> mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).reshape(-1)  # two children
        >>> tree = TreeMask(mask, np.array([-1, 0]))  # request 0 causal, request 1 the tree
        >>> batch = SimpleNamespace(extend_lens_cpu=np.array([2, 3]), tree_mask=tree, input_ids=torch.zeros(5))
        >>> new_token_positions(batch).tolist()
        [0, 1, 0, 1, 1]
    """
    ext = np.asarray(batch.extend_lens_cpu, dtype=np.int64)
    starts = np.cumsum(ext) - ext
    dev = batch.input_ids.device
    pos = torch.from_numpy(np.arange(int(ext.sum())) - np.repeat(starts, ext)).to(dev)
    tree = batch.tree_mask
    if tree is None or not (tree.offsets >= 0).any():
        return pos
    reqs = np.flatnonzero(tree.offsets >= 0)
    n = ext[reqs]  # [Bt] rows of each tree, each row n wide in the flat mask
    rows = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # row index within its tree
    row_start = np.repeat(tree.offsets[reqs], n) + rows * np.repeat(n, n)  # [R] first entry of each row
    total = torch.cumsum(tree.mask.to(torch.int64), 0)
    total = torch.cat([total.new_zeros(1), total])  # total[e]: set entries before e
    ends = torch.from_numpy(row_start + np.repeat(n, n)).to(dev)
    depth = total[ends] - total[torch.from_numpy(row_start).to(dev)] - 1
    pos[torch.from_numpy(np.repeat(starts[reqs], n) + rows).to(dev)] = depth
    return pos


class AttentionBackend(ABC):
    supports_cuda_graph = False  # backends that can run inside a captured CUDA graph say so
    supports_tree_mask = False  # backends that read ``batch.tree_mask`` say so
    supports_image_spans = False  # backends that read ``batch.multimodal.image_spans`` say so

    @abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        batch: ForwardBatch,
        kv_stored: bool = False,
    ) -> torch.Tensor: ...

    def check_kv_cache_dtype(self, dtype: torch.dtype) -> None:
        """Raise ``UnsupportedModelError`` if this backend cannot read a KV pool of ``dtype`` on its device."""
        return None

    def graph_metadata(self, batch: ForwardBatch, max_seq_len: int) -> Any:
        """Metadata for a decode batch captured in a CUDA graph: it may only reference ``batch``'s device tensors
        (whose contents change between replays) and must fit any sequence up to ``max_seq_len`` tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def graph_seq_lens(
        self, batch_size: int, context_length: int, head_dim: int, dtype: torch.dtype
    ) -> tuple[int, ...]:
        """The longest sequence each decode graph of ``batch_size`` is captured for, ascending, the last
        ``context_length``; a replay takes the first that fits its batch. More than one lets a backend choose
        kernels for short sequences (``head_dim`` and ``dtype``: the model's attention heads)."""
        return (context_length,)

    def prepare_graph_replay(self, metadata: Any, seq_lens: np.ndarray) -> None:
        """Before a replay of the graph captured with ``metadata``: its batch's device buffers (and
        ``req_to_token``) already hold this step; ``seq_lens`` [graph batch size] is their sequence lengths on the
        host, padding rows included. Must not wait for the device."""
        return None
