"""A roofline model of LLM serving: the least time a workload can take on a device, from bytes and FLOPs.

Each step of the engine reads every weight once and the KV of every request in the batch, and does ``2 * params``
FLOPs per token plus attention. With the device's measured copy bandwidth ``bw`` (bytes read + written per second
by a large device-to-device copy) and matmul rate ``rate`` (a large bf16 GEMM), a step cannot take less than
``max(bytes / bw, flops / rate)``. A workload's floor is the sum over its steps:

* prefill of ``n`` prompts of ``L`` tokens: ``n * (2 * P * L + 2 * L^2 * H * D * layers) / rate``;
* decode in rounds of ``B`` concurrent requests (``B`` limited by ``max_running_requests`` and the KV pool),
  ``out`` steps per round at the mean context ``in + out / 2``:
  ``max((W + B * ctx * kv_bytes) / bw, B * (2 * P + 4 * ctx * H * D * layers) / rate)``.

``P`` counts the parameters used in matmuls (every layer plus the LM head; the input embedding is a row gather,
so it is not read whole), ``W`` their bytes *as held*: :meth:`ModelCost.from_model` sums what a loaded model holds
(a quantized projection at its encoded size, scales and zero points included), :meth:`ModelCost.from_config`
counts the same from the shapes and the ``quantization`` (INT4: half a byte per weight plus a 2-byte scale and a
1-byte zero point per row and group; FP8: a byte plus a float32 scale per row, or per row and 128-column block;
the LM head, embeddings, routers and MoE experts stay in the model's dtype, as the engine holds them). ``kv_bytes``
is one byte per value with an FP8 KV cache (``kv_cache_dtype``).

MoE models multiply each token by its ``k`` routed experts only, and a step reads the experts its tokens were
routed to: with ``E`` experts and ``n`` tokens routed uniformly at random, ``E * (1 - (1 - k / E) ** n)`` of them
per sparse layer on average (``k`` at batch 1, all of them for a large prefill). ``W`` then depends on the step
(:meth:`ModelCost.step_weight_bytes`).

A *shared prefix* (``shared`` tokens every request of a workload starts with) is computed once and held once in
the KV pool, as the radix cache does: prefill computes it for one request and only the suffixes for the others,
a decode step reads its KV once for the whole batch (``(shared + B * (ctx - shared)) * kv_bytes``; attention
FLOPs still count it for every request, since each query attends to it), and the KV pool's fit counts its pages
once (``B = (slots - shared) // (in - shared + out)``; :func:`shared_prefix_floor_s`).

A floor that a measurement beats is not a floor: :func:`format_fraction` prints a share above 1.0 only with a
warning attached.

That ``max`` assumes the weight reads, the KV reads and the FLOPs of a step could all overlap. The engine runs a
step's kernels one after another, and its two kinds of work have different limits: the GEMMs (weights, ``2 * P``
FLOPs per token) and attention (KV bytes, ``4 * ctx * H * D * layers`` FLOPs per token). The *phased* floor
(``phased=True``) bounds each phase on its own and adds them: ``max(W / bw, B * 2 * P / rate) + max(B * ctx *
kv_bytes / bw, B * attn_flops / rate)``. It is never below the plain floor; at large batches and long contexts it is
the more honest yardstick (the GEMMs turn compute-bound while attention stays bandwidth-bound).

Example::

    >>> from sgl_ray.bench.roofline import DeviceRates, ModelCost, decode_floor_tok_s
    >>> cost = ModelCost(matmul_params=7.5e9, weight_bytes=15e9, kv_bytes_per_token=131072, attn_flops_per_ctx=524288)
    >>> round(decode_floor_tok_s(cost, DeviceRates(3.0e12, 7.9e14), batch=1, context=1024), 1)
    198.2
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from sgl_ray.configs.model_config import ModelConfig


@dataclass(frozen=True)
class DeviceRates:
    copy_bytes_per_s: float  # bytes read + written per second by a large device-to-device copy
    matmul_flops_per_s: float  # dense matmul in the model's dtype


@dataclass(frozen=True)
class ModelCost:
    matmul_params: float  # parameters multiplied per token (all layers + LM head)
    weight_bytes: float  # their bytes: read once per step
    kv_bytes_per_token: float  # K and V of one token, all layers
    attn_flops_per_ctx: (
        float  # attention FLOPs per new token per context token (4 * heads * head_dim * layers)
    )
    # MoE: bytes of one routed expert summed over the sparse layers (not in weight_bytes), experts, top-k
    expert_bytes: float = 0.0
    num_experts: int = 0
    top_k: int = 0
    # how the weights are held, e.g. "bfloat16" or "AWQ + bfloat16", and their bytes by kind of layer
    # ("AWQ", "FP8", "Q4_K", … for quantized projections; "float", "lm_head", "embedding", "experts")
    weight_format: str = ""
    held_bytes: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        quantization: str | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> ModelCost:
        """The cost of ``config``'s model with its projections held as ``quantization`` (``awq``/``gptq``: INT4,
        ``fp8``, ``compressed-tensors``: FP8; None, ``none``, ``gguf``: the model's dtype; a GGUF file's blocks
        are counted by :meth:`from_model` only) and an FP8 KV cache when ``kv_dtype`` is one."""
        h, d, layers = config.hidden_size, config.head_dim, config.num_layers
        q, kv = config.num_heads * d, config.num_kv_heads * d
        sparse = sum(config.is_sparse_layer(i) for i in range(layers))
        elem = torch.tensor([], dtype=config.dtype).element_size()
        held = projection_bytes_fn(config, quantization)
        # [out, in] of each projection of a layer: q, k, v, o; gate, up, down (dense MLP or shared experts)
        attention = [(q, h), (kv, h), (kv, h), (h, q)]
        mlp = [(config.intermediate_size, h)] * 2 + [(h, config.intermediate_size)]
        shared_i = config.shared_expert_intermediate_size
        shared = [(shared_i, h)] * 2 + [(h, shared_i)] if shared_i else []
        projections = layers * attention + (layers - sparse) * mlp + sparse * shared
        expert = 3 * h * config.moe_intermediate_size
        floats = sparse * h * config.num_experts + h * config.vocab_size  # routers, the LM head
        params = sum(n * k for n, k in projections)
        proj_bytes = sum(held(n, k) for n, k in projections)
        kind = quantized_kind(quantization)
        dtype_name = str(config.dtype).removeprefix("torch.")
        by_kind = {kind or "float": proj_bytes}  # the input embedding is not read whole: left out
        by_kind["float"] = by_kind.get("float", 0) + sparse * h * config.num_experts * elem  # routers
        by_kind.update(
            lm_head=h * config.vocab_size * elem, experts=config.num_experts * sparse * expert * elem
        )
        return cls(
            matmul_params=float(params + floats + sparse * config.num_experts_per_tok * expert),
            weight_bytes=float(proj_bytes + floats * elem),
            kv_bytes_per_token=float(config.kv_bytes_per_token(kv_dtype=kv_dtype)),
            attn_flops_per_ctx=float(4 * q * layers),
            expert_bytes=float(sparse * expert * elem),
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            weight_format=f"{kind} + {dtype_name}" if kind else dtype_name,
            held_bytes=tuple((k, float(b)) for k, b in by_kind.items() if b),
        )

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, config: ModelConfig, kv_dtype: torch.dtype | None = None
    ) -> ModelCost:
        """The cost of a loaded ``model`` (one shard holding every layer): ``weight_bytes`` the bytes it holds
        (:func:`held_weight_bytes`) less the input embedding (a row gather; counted when the LM head shares it)
        and the MoE experts (per step: :meth:`step_weight_bytes`); FLOPs from ``config``."""
        by_kind = held_weight_bytes(model)
        base = cls.from_config(config, kv_dtype=kv_dtype)
        experts = by_kind.get("experts", 0)
        read = sum(b for k, b in by_kind.items() if k not in ("embedding", "experts"))
        quantized = sorted(k for k in by_kind if k not in ("float", "lm_head", "embedding", "experts"))
        dtype_name = str(config.dtype).removeprefix("torch.")
        return cls(
            matmul_params=base.matmul_params,
            weight_bytes=float(read),
            kv_bytes_per_token=base.kv_bytes_per_token,
            attn_flops_per_ctx=base.attn_flops_per_ctx,
            expert_bytes=float(experts / config.num_experts) if config.num_experts else 0.0,
            num_experts=base.num_experts,
            top_k=base.top_k,
            weight_format=" + ".join([*quantized, dtype_name]),
            held_bytes=tuple((k, float(b)) for k, b in sorted(by_kind.items())),
        )

    def step_weight_bytes(self, tokens: float) -> float:
        """Weight bytes a step of ``tokens`` tokens reads: every dense weight, and (MoE) the experts that
        uniformly random routing touches on average (see the module docstring)."""
        if not self.num_experts:
            return self.weight_bytes
        touched = self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** tokens)
        return self.weight_bytes + touched * self.expert_bytes

    @property
    def total_weight_bytes(self) -> float:
        """Every weight, all experts included (what the device holds)."""
        return self.weight_bytes + self.num_experts * self.expert_bytes


INT4_SCALE_ZERO_BYTES = (
    3  # per row and group: a 16-bit scale and an 8-bit zero point, as the engine holds them
)
FP8_BLOCK = 128


def quantized_kind(quantization: str | None) -> str:
    """The encoding a ``quantization`` value holds projections in ("" for float)."""
    return {"awq": "AWQ", "gptq": "GPTQ", "fp8": "FP8", "compressed-tensors": "FP8"}.get(
        quantization or "", ""
    )


def projection_bytes_fn(config: ModelConfig, quantization: str | None):
    """``(out, in) -> bytes`` of one projection weight held as ``quantization`` (see :meth:`ModelCost.from_config`);
    the group size and FP8 block layout are the checkpoint's (``quantization_config``), else those of
    quantization at load (INT4: :func:`~sgl_ray.layers.quantization.int4_formats.int4_group_size`; FP8: one scale
    per row)."""
    from sgl_ray.layers.quantization.int4_formats import int4_group_size
    from sgl_ray.layers.quantization.methods import quantization_config

    elem = torch.tensor([], dtype=config.dtype).element_size()
    qc = quantization_config(config.hf_config) or {}
    kind = quantized_kind(quantization)
    if kind in ("AWQ", "GPTQ"):
        checkpoint_group = int(qc.get("group_size", qc.get("q_group_size", 0)) or 0)

        def int4(n: int, k: int) -> float:
            group = k if checkpoint_group < 0 else checkpoint_group or int4_group_size(k)
            return n * k / 2 + n * (k // group) * INT4_SCALE_ZERO_BYTES

        return int4
    if kind == "FP8":
        blocks = qc.get("weight_block_size") is not None or any(
            (g.get("weights") or {}).get("strategy") == "block"
            for g in (qc.get("config_groups") or {}).values()
        )
        return lambda n, k: n * k + 4 * n * (-(-k // FP8_BLOCK) if blocks else 1)
    return lambda n, k: n * k * elem


def held_weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes a loaded model's weights take as held, by kind: each quantized encoding's projections (``"AWQ"``,
    ``"GPTQ"``, ``"FP8"``, ``"Q4_K"``, …, scales and zero points included), ``"float"`` (other float parameters:
    float projections, norms, routers), ``"lm_head"``, ``"embedding"`` (the input table, when the LM head does not
    share it) and ``"experts"`` (MoE). Each storage is counted once, the LM head's first. Sums to
    :func:`~sgl_ray.layers.quantization.weight_nbytes` of the model."""
    from sgl_ray.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from sgl_ray.layers.moe.experts import FusedExperts
    from sgl_ray.layers.quantization import QuantizedWeight

    def kind_of(module: torch.nn.Module) -> str:
        if isinstance(module, ParallelLMHead):
            return "lm_head"
        if isinstance(module, VocabParallelEmbedding):
            return "embedding"
        return "experts" if isinstance(module, FusedExperts) else "float"

    modules = sorted(model.modules(), key=lambda m: not isinstance(m, ParallelLMHead))  # the LM head first
    out: dict[str, int] = {}
    seen_weights: set[int] = set()  # QuantizedWeight objects
    seen: set[int] = set()  # parameter storages
    for module in modules:
        if isinstance(module, QuantizedWeight):
            continue
        for child_name, child in module.named_children():
            if child_name != "weight" or not isinstance(child, QuantizedWeight) or id(child) in seen_weights:
                continue
            seen_weights.add(id(child))
            kind = kind_of(module)
            for _, matrix in child.segments:
                key = kind if kind != "float" else ("float" if matrix.kind == "dense" else matrix.kind)
                out[key] = out.get(key, 0) + matrix.nbytes
        for p in module.parameters(recurse=False):
            storage = p.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            kind = kind_of(module)
            out[kind] = out.get(kind, 0) + storage.nbytes()
    return out


def describe_cost(cost: ModelCost) -> dict[str, Any]:
    """The facts of a cost a report shows: the weights' format, bytes held by kind, bytes read per step, KV bytes
    per token."""
    return {
        "weight_format": cost.weight_format,
        "weight_bytes_by_kind": dict(cost.held_bytes),
        "step_weight_bytes": cost.step_weight_bytes(1),
        "kv_bytes_per_token": cost.kv_bytes_per_token,
    }


def decode_step_s(
    cost: ModelCost,
    rates: DeviceRates,
    batch: int,
    context: float,
    phased: bool = False,
    shared: float = 0,
) -> float:
    """Floor of one decode step of ``batch`` requests at ``context`` tokens each, the first ``shared`` of them
    common to all (their KV read once); ``phased``: see the module."""
    bw, rate = rates.copy_bytes_per_s, rates.matmul_flops_per_s
    gemm_bytes, gemm_flops = cost.step_weight_bytes(batch), batch * 2 * cost.matmul_params
    shared = min(shared, context)
    attn_bytes = (shared + batch * (context - shared)) * cost.kv_bytes_per_token
    attn_flops = batch * cost.attn_flops_per_ctx * context
    if phased:
        return max(gemm_bytes / bw, gemm_flops / rate) + max(attn_bytes / bw, attn_flops / rate)
    return max((gemm_bytes + attn_bytes) / bw, (gemm_flops + attn_flops) / rate)


def decode_floor_tok_s(
    cost: ModelCost, rates: DeviceRates, batch: int, context: float, phased: bool = False
) -> float:
    return batch / decode_step_s(cost, rates, batch, context, phased)


def prefill_s(
    cost: ModelCost, rates: DeviceRates, num: int, input_len: int, cached: int = 0, phased: bool = False
) -> float:
    """Floor of prefilling ``num`` prompts of ``input_len`` tokens whose first ``cached`` are already cached."""
    new = input_len - cached
    attn = num * cost.attn_flops_per_ctx * (input_len**2 - cached**2) / 2  # causal: the sum of the contexts
    gemm = num * 2 * cost.matmul_params * new
    rate, weights_s = rates.matmul_flops_per_s, cost.step_weight_bytes(num * new) / rates.copy_bytes_per_s
    if phased:
        return max(gemm / rate, weights_s) + attn / rate
    return max((gemm + attn) / rate, weights_s)


def workload_floor_s(
    cost: ModelCost,
    rates: DeviceRates,
    num: int,
    input_len: int,
    output_len: int,
    max_batch: int,
    cached: int = 0,
    phased: bool = False,
    shared: int = 0,
) -> float:
    """Least time for ``num`` requests of ``input_len`` in / ``output_len`` out, ``max_batch`` at once, the first
    ``cached`` prompt tokens of each already computed and the first ``shared`` common to all (read once per step).
    """
    total = prefill_s(cost, rates, num, input_len, cached, phased)
    rounds, last = divmod(num, max_batch)
    context = input_len + output_len / 2
    total += rounds * output_len * decode_step_s(cost, rates, max_batch, context, phased, shared)
    if last:
        total += output_len * decode_step_s(cost, rates, last, context, phased, shared)
    return total


def shared_prefix_floor_s(
    cost: ModelCost,
    rates: DeviceRates,
    num: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    num_slots: int,
    max_running: int,
    phased: bool = False,
) -> float:
    """Least time for ``num`` requests of one common ``prefix_len``-token prefix and their own ``suffix_len``
    tokens, ``output_len`` out each, with ``num_slots`` KV slots and ``max_running`` requests at most: the prefix
    prefilled once, and its KV held once (in the pool's fit) and read once per decode step."""
    batch = max_batch_for(num_slots, max_running, prefix_len + suffix_len, output_len, shared=prefix_len)
    prefix = prefill_s(cost, rates, 1, prefix_len, phased=phased) if prefix_len else 0.0
    rest = workload_floor_s(
        cost, rates, num, prefix_len + suffix_len, output_len, batch, prefix_len, phased, shared=prefix_len
    )
    return prefix + rest


def max_batch_for(num_slots: int, max_running: int, input_len: int, output_len: int, shared: int = 0) -> int:
    """Requests that fit at once: the request limit, and whole sequences in the KV pool, the first ``shared``
    tokens of every prompt (a common prefix) held once."""
    return max(1, min(max_running, (num_slots - shared) // (input_len - shared + output_len)))


def _cuda_time(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _cpu_time(fn, iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def measure_device(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> DeviceRates:
    """Copy bandwidth (1 GiB device-to-device, or 256 MiB on CPU) and matmul rate (8192^3, or 2048^3 on CPU)."""
    cuda = device.type == "cuda"
    timer = _cuda_time if cuda else _cpu_time
    nbytes = (1 << 30) if cuda else (1 << 28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src), 20 if cuda else 5)
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = timer(lambda: a @ b, 20 if cuda else 3)

    return DeviceRates(copy_bytes_per_s=2 * nbytes / copy_s, matmul_flops_per_s=2 * n**3 / mm_s)


def fraction(floor_s: float, measured_s: float) -> float:
    """Share of the roofline achieved (1.0 = at the floor)."""
    return floor_s / measured_s if measured_s > 0 else math.nan


ABOVE_FLOOR = "faster than a floor allows, so the floor's model of this workload is wrong"


def format_fraction(value: float | None) -> str:
    """A share of a floor for a report: ``-`` when there is none, two decimals up to 1.0, and above 1.0 never
    bare — the number with a warning (a beaten floor is not a floor; fix the model, do not report the number).

    >>> format_fraction(0.934), format_fraction(None), format_fraction(1.23)
    ('0.93', '-', '1.23 (WARNING: above the floor)')
    """
    if value is None or math.isnan(value):
        return "-"
    if value > 1.0:
        return f"{value:.2f} (WARNING: above the floor)"
    return f"{value:.2f}"
