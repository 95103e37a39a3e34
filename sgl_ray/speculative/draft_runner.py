"""What every drafter on the runner shares (a draft model, an EAGLE head, an MTP layer): its runner's options, its
forward batches, and the checks that a draft model speaks the target's vocabulary."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sgl_ray.errors import InvalidRequestError
from sgl_ray.runner.forward_batch import ForwardBatch
from sgl_ray.transfer import to_device


def check_draft_vocabulary(target_vocab_size: int, draft_hf_config: Any, path: str) -> None:
    if draft_hf_config.vocab_size != target_vocab_size:
        raise InvalidRequestError(
            f"speculative_draft_model_path: the draft model {path!r} has a vocabulary of "
            f"{draft_hf_config.vocab_size} tokens, the target {target_vocab_size}; a draft model must share the "
            "target's tokenizer and vocabulary",
            param="speculative_draft_model_path",
        )


def draft_runner_args(args: Any, path: str) -> Any:
    """The engine options of a draft runner (a draft model or an EAGLE head) at ``path``: the target's, less what
    belongs to the target alone (its tokenizer, quantization, LoRA, CUDA graphs, speculative decoding itself)."""
    return args.replace(
        model_path=path,
        tokenizer_path=None,
        revision=None,
        quantization=None,
        enable_lora=False,
        lora_paths=None,
        disable_cuda_graph=True,
        speculative_algorithm=None,
        speculative_draft_model_path=None,
    )


def draft_batch(
    runner: Any,
    input_ids: torch.Tensor,
    prefix: np.ndarray,
    ext: np.ndarray,
    req_pool_idxs: np.ndarray,
    out_cache_loc: torch.Tensor,
    logits_indices: torch.Tensor,
    req_to_token: torch.Tensor | None = None,
) -> ForwardBatch:
    """A draft runner's extend batch over ``ext`` new tokens per request after ``prefix`` cached ones, its
    attention metadata initialized (the request table, or ``req_to_token``: a draft tree's branch rows, already
    maps every position it reads)."""
    dev = input_ids.device
    starts = np.cumsum(ext) - ext
    positions = np.repeat(prefix - starts, ext) + np.arange(int(ext.sum()))
    batch = ForwardBatch(
        input_ids=input_ids,
        positions=to_device(positions, dev),
        out_cache_loc=out_cache_loc,
        req_pool_idxs=to_device(req_pool_idxs, dev),
        seq_lens=to_device(prefix + ext, dev),
        extend_start_loc=to_device(starts, dev),
        logits_indices=logits_indices,
        prefix_lens_cpu=prefix,
        extend_lens_cpu=ext,
        kv_pool=runner.kv_pool,
        req_to_token=runner.req_table.table if req_to_token is None else req_to_token,
        attn_backend=runner.attn_backend,
        moe_backend=runner.moe_backend,
    )
    runner.attn_backend.init_forward_metadata(batch)
    return batch


def check_draft_tokenizer(target_tokenizer: Any, path: str) -> None:
    """Where the draft model ships a tokenizer, it must map the same strings to the same ids as the target's."""
    from sgl_ray.model_loader import load_tokenizer, resolve_model

    if target_tokenizer is None:
        return
    try:
        draft = load_tokenizer(resolve_model(path, weights=False))
    except Exception:  # noqa: BLE001 - no tokenizer files: the vocabulary size was checked
        return
    if draft.get_vocab() != target_tokenizer.get_vocab():
        raise InvalidRequestError(
            f"speculative_draft_model_path: the tokenizer of the draft model {path!r} differs from the target's "
            "(same size, different tokens); a draft model must share the target's vocabulary",
            param="speculative_draft_model_path",
        )
