"""Attention over the paged KV pool with Triton kernels (the CUDA default).

Per step, :meth:`TritonAttentionBackend.init_forward_metadata` splits the batch into decode requests
(``extend_len == 1``) and extend requests (``extend_len > 1``) and ships their index arrays to the device in one
copy; per layer, :meth:`~TritonAttentionBackend.forward` stores the new K/V and launches at most three kernels
(decode stage 1, its split reduce, extend), reading only host integers from the metadata. A layer's sliding window,
sinks and score cap (``RadixAttention.sliding_window`` / ``.sinks`` / ``.logit_cap``) are per-layer constants
handed to the kernels, so the same metadata (and CUDA graph) serves every layer, as are an FP8 pool's per-layer
K/V scales (``kv_cache_dtype``; see ``triton_kernels``). A step whose requests reach into images that attend to
each other both ways (Gemma 3: ``batch.multimodal.image_spans``) ships one more array in the same copy, the end of
each token's image (``triton_extend``'s ``HAS_IMAGES``); decode rows need none (nothing follows their token). A
step verifying draft trees gives its windowed layers each token's position among its request's new tokens (a tree
row's depth, ``base.new_token_positions``), built on the first such layer and kept for the step. In hybrid KV
pools (``mem_cache.hybrid_swa``) a windowed layer stores at ``batch.swa_out_cache_loc`` and its kernels read the
request table through ``batch.full_to_swa`` (``triton_kernels.load_slots``): the metadata is the same for every
layer, and a step translates only its new tokens' slots.

Example (on a CUDA machine; the model runner does this through ``create_attention_backend``)::

    >>> backend = TritonAttentionBackend(torch.device("cuda"))  # doctest: +SKIP
    >>> backend.init_forward_metadata(batch)  # doctest: +SKIP
    >>> out = backend.forward(q, k, v, layer, batch)  # doctest: +SKIP  # [T, H * D]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from sgl_ray.attention.base import AttentionBackend, image_key_ends, new_token_positions
from sgl_ray.attention.triton_extend import EXTEND_BLOCK_M, extend_attention
from sgl_ray.attention.triton_kernels import (
    DecodeConfig,
    decode_attention,
    decode_config,
    short_decode_len,
)
from sgl_ray.errors import UnsupportedModelError
from sgl_ray.transfer import to_device

if TYPE_CHECKING:
    from sgl_ray.layers.attention import RadixAttention
    from sgl_ray.runner.forward_batch import ForwardBatch

MAX_KV_SPLITS = 64
MIN_SPLIT_TOKENS = 128  # below this a split costs more in launch and reduce than it gains in parallelism
WAVES = 4  # stage-1 programs per multiprocessor to aim for


def _padded(n: int) -> int:
    """``n`` int32 entries rounded up to whole 16-byte units."""
    return -(-n // 4) * 4


def _image_ends(
    batch: ForwardBatch, ext_rows: np.ndarray, starts: np.ndarray, prefix: np.ndarray
) -> np.ndarray | None:
    """[T] per token row of the step: the end (exclusive) of the new keys it sees, counted among its request's
    new tokens, where it is inside an image (``image_key_ends``), else 0. None when no extend row is in an image."""
    if getattr(batch.multimodal, "image_spans", None) is None:
        return None
    out = None
    for r in ext_rows:
        p, n = int(prefix[r]), int(batch.extend_lens_cpu[r])
        ends = image_key_ends(batch, int(r), p, p + n)
        if ends is None:
            continue
        if out is None:
            out = np.zeros(int(batch.extend_lens_cpu.sum()), dtype=np.int32)
        inside = ends > np.arange(p + 1, p + n + 1)  # the tokens that see past themselves
        out[starts[r] : starts[r] + n] = np.where(inside, ends - p, 0)
    return out


@dataclass(frozen=True)
class _DecodePart:
    rows: torch.Tensor  # [Bd] int32 batch rows
    tokens: torch.Tensor  # [Bd] int32 rows of q / out
    seq_lens: torch.Tensor  # [Bd] int32
    num: int
    max_seq_len: int


@dataclass(frozen=True)
class _ExtendPart:
    # [5, NB] int32, rows 16-byte aligned: batch row, first-token row, q_start, prefix_len, extend_len
    blocks: torch.Tensor
    num_blocks: int
    tree_mask: torch.Tensor | None = None  # [sum n * n] uint8 draft-tree masks (batch.tree_mask)
    blk_tree: torch.Tensor | None = None  # [NB] int32 offset of each block's request in tree_mask, -1: causal
    # [T] int32 per token row: the end of its image among its request's new tokens, 0 outside images
    image_end: torch.Tensor | None = None


@dataclass
class _Metadata:
    decode: _DecodePart | None
    extend: _ExtendPart | None
    # [T] int32 each token row's position among its request's new tokens (a draft tree's rows: their depth), set
    # by the first windowed layer of a step with draft trees (base.new_token_positions)
    new_pos: torch.Tensor | None = None


class TritonAttentionBackend(AttentionBackend):
    """``num_kv_splits`` fixes the decode split count (a power of two); ``None`` picks it per step and layer."""

    supports_cuda_graph = True
    supports_tree_mask = True
    supports_image_spans = True

    def __init__(self, device: torch.device, num_kv_splits: int | None = None) -> None:
        self.device = torch.device(device)
        if num_kv_splits is not None and (num_kv_splits < 1 or num_kv_splits & (num_kv_splits - 1)):
            raise ValueError(f"num_kv_splits must be a power of two, got {num_kv_splits}")
        self.num_kv_splits = num_kv_splits
        if self.device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:  # Triton's interpreter (TRITON_INTERPRET=1), for debugging without a GPU
            self.num_sms = 8

    def check_kv_cache_dtype(self, dtype: torch.dtype) -> None:
        """Triton converts FP8 e4m3 on compute capability 8.9 and up only (e5m2 anywhere)."""
        if dtype == torch.float8_e4m3fn and self.device.type == "cuda":
            capability = torch.cuda.get_device_capability(self.device)
            if capability < (8, 9):
                raise UnsupportedModelError(
                    "kv_cache_dtype='fp8_e4m3' (--kv-cache-dtype fp8_e4m3): the Triton attention kernels read "
                    f"e4m3 on compute capability 8.9 or more, this card has {capability[0]}.{capability[1]}; "
                    "use kv_cache_dtype='fp8_e5m2'",
                    param="kv_cache_dtype",
                )

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        ext = batch.extend_lens_cpu.astype(np.int64)
        prefix = batch.prefix_lens_cpu.astype(np.int64)
        starts = np.concatenate(([0], np.cumsum(ext)[:-1]))
        dec_rows = np.nonzero(ext == 1)[0]
        ext_rows = np.nonzero(ext > 1)[0]

        # Extend blocks, most work first so that the long ones do not start last.
        nblk = -(-ext[ext_rows] // EXTEND_BLOCK_M)  # [Be]
        blk_req = np.repeat(ext_rows, nblk)  # [NB]
        blk_qstart = (np.arange(nblk.sum()) - np.repeat(np.cumsum(nblk) - nblk, nblk)) * EXTEND_BLOCK_M
        order = np.argsort(-(prefix[blk_req] + blk_qstart), kind="stable")
        blk_req, blk_qstart = blk_req[order], blk_qstart[order]

        # One copy for the whole step. Every array starts 16 bytes into a row of ``host``: Triton compiles a
        # kernel variant per alignment of its pointer arguments, and packed end to end the arrays would start at
        # offsets that change with the batch (a new compile, seconds, the first time each combination shows up).
        nd, nb = len(dec_rows), len(blk_req)
        wd, wb = _padded(nd), _padded(nb)
        image_ends = _image_ends(batch, ext_rows, starts, prefix)  # [T] or None
        wi = 0 if image_ends is None else _padded(len(image_ends))
        host = np.zeros(3 * wd + 5 * wb + wi, dtype=np.int32)
        dec_part, blk_part = host[: 3 * wd].reshape(3, wd), host[3 * wd : 3 * wd + 5 * wb].reshape(5, wb)
        if image_ends is not None:
            host[3 * wd + 5 * wb :][: len(image_ends)] = image_ends
        for row, values in zip(dec_part, (dec_rows, starts[dec_rows], prefix[dec_rows] + 1), strict=True):
            row[:nd] = values
        for row, values in zip(
            blk_part, (blk_req, starts[blk_req], blk_qstart, prefix[blk_req], ext[blk_req]), strict=True
        ):
            row[:nb] = values
        dev = self._to_device(host)
        decode = extend = None
        if nd:
            rows, tokens, seq_lens = dev[: 3 * wd].view(3, wd)[:, :nd]
            decode = _DecodePart(
                rows=rows,
                tokens=tokens,
                seq_lens=seq_lens,
                num=nd,
                max_seq_len=int(prefix[dec_rows].max()) + 1,
            )
        if nb:
            image_end = None if image_ends is None else dev[3 * wd + 5 * wb :][: len(image_ends)]
            extend = _ExtendPart(dev[3 * wd : 3 * wd + 5 * wb].view(5, wb)[:, :nb], nb, image_end=image_end)
            tree = batch.tree_mask
            if tree is not None and (tree.offsets[blk_req] >= 0).any():
                blk_tree = self._to_device(tree.offsets[blk_req].astype(np.int32))
                extend = _ExtendPart(extend.blocks, nb, tree.mask.view(torch.uint8), blk_tree, image_end)
        batch.attn_metadata = _Metadata(decode, extend)

    def graph_metadata(self, batch: ForwardBatch, max_seq_len: int) -> _Metadata:
        """Row ``i`` of a padded decode batch is request ``i`` and token ``i``; the split count is fixed for
        ``max_seq_len`` (the kernels skip the splits past each sequence's end)."""
        rows = batch.extend_start_loc  # arange(bs)
        decode = _DecodePart(
            rows=rows, tokens=rows, seq_lens=batch.seq_lens, num=batch.batch_size, max_seq_len=max_seq_len
        )
        return _Metadata(decode, None)

    def graph_seq_lens(
        self, batch_size: int, context_length: int, head_dim: int, dtype: torch.dtype
    ) -> tuple[int, ...]:
        """Two decode graphs for one or two requests of bf16/fp16 heads up to 128 wide: sequences of up to
        ``short_decode_len`` tokens get 32-key splits that prefetch their KV (see ``decode_config``), longer ones
        the usual shape. Other heads run one shape at any length, so they get one graph."""
        short = short_decode_len(batch_size, head_dim, dtype)
        if 0 < short < context_length:
            return (short, context_length)
        return (context_length,)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        batch: ForwardBatch,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        num_tokens = q.shape[0]
        h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        q = q.view(num_tokens, h, d)
        k, v = k.view(-1, kvh, d), v.view(-1, kvh, d)
        # Hybrid pools: a windowed layer stores at its own slots and reads the (full) table through the map
        slot_map = batch.slot_map(layer)
        req_to_token, req_pool_idxs = batch.req_to_token, batch.req_pool_idxs
        if not kv_stored:
            batch.kv_pool.set_kv(layer.layer_id, batch.store_loc(layer), k, v)
        k_buf, v_buf = batch.kv_pool.get_kv(layer.layer_id)
        kv_scale = batch.kv_pool.scales[layer.layer_id]  # 1.0 but for an FP8 pool
        meta: _Metadata = batch.attn_metadata
        out = self._new_buffer((num_tokens, h, d), q.dtype)  # every row is written by one of the kernels
        if meta.decode is not None:
            dec = meta.decode
            config = decode_config(d, q.dtype, dec.num, dec.max_seq_len)
            decode_attention(
                q,
                k_buf,
                v_buf,
                out,
                req_to_token,
                req_pool_idxs,
                dec.rows,
                dec.tokens,
                dec.seq_lens,
                self._num_splits(dec, kvh, config, layer.sliding_window),
                layer.scaling,
                self._new_buffer,
                config,
                window=layer.sliding_window,
                sinks=layer.sinks,
                logit_cap=layer.logit_cap,
                k_scale=kv_scale.k,
                v_scale=kv_scale.v,
                slot_map=slot_map,
            )
        if meta.extend is not None:
            new_pos = None
            if meta.extend.tree_mask is not None and layer.sliding_window is not None:
                if meta.new_pos is None:  # a tree row's window reaches back from its depth, not its index
                    meta.new_pos = new_token_positions(batch).to(torch.int32)
                new_pos = meta.new_pos
            extend_attention(
                q,
                k,
                v,
                k_buf,
                v_buf,
                out,
                req_to_token,
                req_pool_idxs,
                meta.extend.blocks,
                layer.scaling,
                window=layer.sliding_window,
                sinks=layer.sinks,
                logit_cap=layer.logit_cap,
                k_scale=kv_scale.k,
                v_scale=kv_scale.v,
                tree_mask=meta.extend.tree_mask,
                blk_tree=meta.extend.blk_tree,
                image_end=meta.extend.image_end,
                new_pos=new_pos,
                slot_map=slot_map,
            )
        return out.view(num_tokens, h * d)

    def _num_splits(
        self, dec: _DecodePart, num_kv_heads: int, config: DecodeConfig, window: int | None = None
    ) -> int:
        """Enough stage-1 programs for ``WAVES`` per multiprocessor, each split at least ``MIN_SPLIT_TOKENS``
        (or one block, where each split prefetches its first block) of the keys a query sees (at most ``window``)."""
        if self.num_kv_splits is not None:
            return self.num_kv_splits
        want = -(-self.num_sms * WAVES // (dec.num * num_kv_heads))
        keys = dec.max_seq_len if window is None else min(dec.max_seq_len, window)
        cap = -(-keys // (config.block_n if config.prefetch else MIN_SPLIT_TOKENS))
        n = max(1, min(want, cap, MAX_KV_SPLITS))
        return 1 << (n.bit_length() - 1)  # round down to a power of two

    def _new_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised scratch/output memory (tests replace this to poison it)."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        return to_device(host, self.device)
