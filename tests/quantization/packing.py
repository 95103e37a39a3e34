"""Quantized checkpoints written by the tests from float weights: AWQ, GPTQ (v1 / v2, act order), FP8 (per tensor,
128x128 blocks, compressed-tensors per channel), each with the float weights its format means (the reference).

Written from the formats' definitions (AutoAWQ's "gemm" packing, AutoGPTQ's packing, the FP8 checkpoint layouts),
independently of the loader's unpacking code, so a test compares two readings of the format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# AutoAWQ: nibble i of a word holds output column 8w + AWQ_PACK_ORDER[i]
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
FP8_MAX = 448.0
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GroupQuant:
    """4-bit values ``q`` [N, K] (0..15), ``scales`` fp16 [G, N], ``zeros`` [G, N] (0..15) and the group of each
    input column ``g_idx`` [K]; ``dequantized()`` is ``(q - z) * s`` in float32 — what the checkpoint means."""

    def __init__(self, q, scales, zeros, g_idx) -> None:
        self.q, self.scales, self.zeros, self.g_idx = q, scales, zeros, g_idx

    def dequantized(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.q.long() - self.zeros.t()[:, g]).float() * self.scales.t()[:, g].float()


def quantize_int4(
    w: torch.Tensor, group: int, sym: bool = False, act_order_seed: int | None = None, min_zero: int = 0
) -> GroupQuant:
    """Round-to-nearest 4-bit groups of ``w`` [N, K] along K. ``sym``: zero point 8 (GPTQ ``sym=True``);
    ``act_order_seed``: columns grouped in a random order (GPTQ ``desc_act``); ``min_zero``: the smallest zero
    point (GPTQ v1 stores ``zero - 1`` in 4 bits, so a zero of 0 cannot be stored)."""
    n, k = w.shape
    order = torch.arange(k)
    if act_order_seed is not None:
        order = torch.randperm(k, generator=torch.Generator().manual_seed(act_order_seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group).to(torch.int32)
    groups = k // group
    scales = torch.empty(groups, n, dtype=torch.float16)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    q = torch.empty(n, k, dtype=torch.int64)
    for j in range(groups):
        cols = (g_idx == j).nonzero().squeeze(1)
        block = w[:, cols].float()  # [N, group]
        if sym:
            s = (block.abs().amax(dim=1) / 7.5).clamp(min=1e-4)
            z = torch.full((n,), 8, dtype=torch.int64)
        else:
            lo, hi = block.amin(dim=1).clamp(max=0), block.amax(dim=1).clamp(min=0)
            s = ((hi - lo) / 15).clamp(min=1e-4)
            z = torch.round(-lo / s.half().float()).long().clamp(min_zero, 15)
        s16 = s.half()
        scales[j], zeros[j] = s16, z
        q[:, cols] = (torch.round(block / s16.float()[:, None]) + z[:, None]).clamp(0, 15).long()
    return GroupQuant(q, scales, zeros, g_idx)


def _pack_words(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """int32 words of 8 values along the last dim: nibble ``i`` holds value ``order[i]`` of each 8."""
    v = values.long().reshape(*values.shape[:-1], -1, 8)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i, src in enumerate(order):
        words |= v[..., src] << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_tensors(gq: GroupQuant) -> dict[str, torch.Tensor]:
    """AutoAWQ "gemm": qweight [K, N/8] and qzeros [G, N/8] packed along the output in AWQ's order."""
    return {
        "qweight": _pack_words(gq.q.t(), AWQ_PACK_ORDER),
        "qzeros": _pack_words(gq.zeros, AWQ_PACK_ORDER),
        "scales": gq.scales.clone(),
    }


def gptq_tensors(gq: GroupQuant, v1: bool = True) -> dict[str, torch.Tensor]:
    """AutoGPTQ: qweight [K/8, N] packed along the input, qzeros [G, N/8] along the output (v1: zero - 1)."""
    stored = (gq.zeros - 1) & 0xF if v1 else gq.zeros
    in_order = list(range(8))
    return {
        "qweight": _pack_words(gq.q, in_order).t().contiguous(),  # word r of column n: inputs 8r .. 8r + 7
        "qzeros": _pack_words(stored, in_order),
        "scales": gq.scales.clone(),
        "g_idx": gq.g_idx.clone(),
    }


def fp8_per_tensor(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``weight`` e4m3 with one float32 ``weight_scale`` (and an ``input_scale``), and the float it means."""
    scale = (w.abs().max().float() / FP8_MAX).reshape(())
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale, "input_scale": torch.tensor(0.05)}, q.float() * scale


def fp8_per_channel(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors ``channel``: ``weight`` e4m3 and ``weight_scale`` [N, 1] (bf16, as some checkpoints
    store it), and the float it means."""
    scale = (w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).to(torch.bfloat16)
    q = (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}, q.float() * scale.float()


def fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """DeepSeek-V3 / Qwen3-FP8: ``weight`` e4m3 and ``weight_scale_inv`` [ceil(N/b), ceil(K/b)] (the factor that
    dequantizes each block), and the float it means. Partial blocks at the edges are allowed."""
    n, k = w.shape
    rows, cols = -(-n // block), -(-k // block)
    scale = torch.empty(rows, cols)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    ref = torch.empty(n, k)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            s = tile.abs().max() / FP8_MAX
            scale[i, j] = s
            qt = (tile / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = qt
            ref[i * block : (i + 1) * block, j * block : (j + 1) * block] = qt.float() * s
    return {"weight": q, "weight_scale_inv": scale}, ref


def fp8_online_reference(w: torch.Tensor) -> torch.Tensor:
    """What ``quantization="fp8"`` makes of a float weight: e4m3 with one scale per output channel."""
    scale = w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR_SUFFIXES


def write_quantized(
    state: dict[str, torch.Tensor], config: dict, directory: Path, quantize, quantization_config: dict | None
) -> dict[str, torch.Tensor]:
    """Save ``state`` (a float model's state dict) with every projection weight replaced by ``quantize(w)`` ->
    ``(tensors by leaf name, float reference)``, ``config`` with ``quantization_config``; returns the reference
    state dict (the float weights the checkpoint means)."""
    directory.mkdir(parents=True, exist_ok=True)
    out, reference = {}, {}
    for name, tensor in state.items():
        if is_linear(name):
            prefix = name.removesuffix(".weight")
            tensors, ref = quantize(tensor)
            out.update({f"{prefix}.{leaf}": t.contiguous() for leaf, t in tensors.items()})
            reference[name] = ref
        else:
            out[name] = tensor.contiguous()
            reference[name] = tensor
    save_file(out, directory / "model.safetensors")
    config = dict(config)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))
    return reference


# the tiny Llama shape of the quantized-engine tests (group-128 INT4 needs 128-wide inputs)
TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=512,
    initializer_range=0.1,
)
