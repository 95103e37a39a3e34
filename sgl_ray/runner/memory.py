"""Sizing the KV pool and the request table from the configuration and the device's memory."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.errors import InvalidRequestError, UnsupportedModelError

_CPU_KV_FRACTION = 0.1  # of physical RAM, when neither max_total_tokens nor mem_fraction_static is given
_GPU_MEM_FRACTION = 0.85  # of the card, for weights + KV
_DEFAULT_MAX_REQS = 256


@dataclass(frozen=True)
class KVCapacity:
    num_slots: int  # including the reserved first page
    max_reqs: int
    # Hybrid pools (models mixing full and sliding-window layers): the windowed layers' slots, including the
    # reserved first page; 0 when every layer keeps every token (``num_slots``)
    swa_num_slots: int = 0


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _kv_budget_bytes(args: EngineArgs, device: torch.device) -> int:
    if device.type == "cuda":
        # Blocks this process's caching allocator holds but no tensor uses (an engine shut down earlier in the
        # process, whose memory was freed after its last reference went) are free for this pool, not in use.
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        fraction = args.mem_fraction_static or _GPU_MEM_FRACTION
        used = total - free - cached
        return max(0, int(total * fraction) - used)
    return int(_physical_memory() * (args.mem_fraction_static or _CPU_KV_FRACTION))


def kv_cache_dtype(args: EngineArgs, config: ModelConfig) -> torch.dtype:
    """What the KV pool stores (``kv_cache_dtype``): the model's dtype, or an FP8 type. A model with multi-head
    latent attention keeps its latent pool in the model's dtype: FP8 there is an :class:`UnsupportedModelError`."""
    dtype = args.kv_cache_torch_dtype(config.dtype)
    if dtype != config.dtype and config.kv_latent_dim:
        raise UnsupportedModelError(
            f"kv_cache_dtype={args.kv_cache_dtype!r} (--kv-cache-dtype {args.kv_cache_dtype}): the latent KV cache "
            "of multi-head latent attention (DeepSeek) is held in the model's dtype only; use kv_cache_dtype='auto'",
            param="kv_cache_dtype",
        )
    return dtype


def plan_kv_capacity(
    args: EngineArgs,
    config: ModelConfig,
    device: torch.device,
    tp_size: int = 1,
    layer_fraction: float = 1.0,
    swa_layer_fraction: float = 0.0,
) -> KVCapacity:
    """Token slots for the KV pool (a whole number of pages plus the reserved one) and request slots.
    ``layer_fraction``: the share of the model's layers this shard holds (pipeline parallelism).

    ``swa_layer_fraction`` > 0 (hybrid pools): that share of the shard's layers keeps its own pool of
    ``swa_full_tokens_ratio`` times the full pool's tokens; the bytes that every layer keeping every token would
    take (``max_total_tokens`` of them, or the memory budget) are split so: ``full * (1 - f + ratio * f)``."""
    page = args.page_size
    kv_dtype = kv_cache_dtype(args, config)  # an unsupported kv_cache_dtype fails here, before any allocation
    if args.max_total_tokens is not None:
        tokens = args.max_total_tokens
    else:
        per_token = max(1, int(config.kv_bytes_per_token(tp_size, kv_dtype) * layer_fraction))
        tokens = _kv_budget_bytes(args, device) // per_token
    swa_tokens = 0
    if swa_layer_fraction > 0:
        ratio = args.swa_full_tokens_ratio
        tokens = int(tokens / (1.0 - swa_layer_fraction + ratio * swa_layer_fraction))
        swa_tokens = (int(tokens * ratio) // page) * page
    tokens = (tokens // page) * page
    if swa_layer_fraction > 0 and swa_tokens < 2 * page:
        raise InvalidRequestError(
            f"not enough memory for the sliding-window layers' KV pool ({swa_tokens} tokens); raise "
            "swa_full_tokens_ratio or max_total_tokens, or set disable_hybrid_swa_memory",
            param="swa_full_tokens_ratio",
        )
    if tokens < 2 * page:
        raise InvalidRequestError(
            f"not enough memory for the KV cache ({tokens} tokens); lower the model size or raise "
            "mem_fraction_static / max_total_tokens",
            param="max_total_tokens",
        )
    max_reqs = args.max_running_requests or _DEFAULT_MAX_REQS
    max_reqs = max(1, min(max_reqs, tokens // 2))
    return KVCapacity(
        num_slots=tokens + page, max_reqs=max_reqs, swa_num_slots=swa_tokens + page if swa_tokens else 0
    )
