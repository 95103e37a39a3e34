"""Multi-head latent attention (MLA: DeepSeek-V2/V2-Lite/V3, Kimi-K2) over a pool of compressed latents.

Each token's keys and values for all heads are up-projections of one latent ``c`` (``kv_lora_rank`` values, normed)
plus a rotated key ``k_pe`` (``qk_rope_head_dim`` values) shared by every head. The KV pool
(:class:`~sgl_ray.mem_cache.kv_pool.MLAKVPool`) holds only ``[c | k_pe]`` per token and layer (576 values for
DeepSeek-V2/V3 instead of 2 x 128 heads x 128), and with ``W_UK`` [H, nope, C] and ``W_UV`` [H, v, C] the two
halves of ``kv_b_proj``::

    head h, query i, key j:   k_j = [W_UK[h] c_j | k_pe_j]     v_j = W_UV[h] c_j
    score = scale * (q_nope_i . W_UK[h] c_j + q_pe_i . k_pe_j)
          = scale * ((W_UK[h]^T q_nope_i) . c_j + q_pe_i . k_pe_j)          absorbed: W_UK folded into the query
    out_i = sum_j p_ij W_UV[h] c_j = W_UV[h] (sum_j p_ij c_j)                absorbed: W_UV after attention

Decode rows take the absorbed form, an attention of all H query heads against one shared "KV head" of width
``C + R`` (values: its first ``C`` columns), so the pool is read once per request and never expanded. Extend rows
(prefill, and the new tokens after a prefix-cache hit) up-project the latents of their whole sequence to per-head
K/V and attend like any other layer — cheaper per score when many queries share the keys.

:class:`~sgl_ray.attention.mla.layer.LatentAttention` is what a model's attention block hands its q and latents to;
:class:`~sgl_ray.attention.mla.base.MLAAttentionBackend` is the backend seam (torch on CPU, Triton's split-KV
decode on CUDA), created for MLA models by ``create_attention_backend(..., mla=True)``.
"""

from sgl_ray.attention.mla.base import ExtendSpan, MLAAttentionBackend
from sgl_ray.attention.mla.layer import LatentAttention

__all__ = ["ExtendSpan", "LatentAttention", "MLAAttentionBackend"]
