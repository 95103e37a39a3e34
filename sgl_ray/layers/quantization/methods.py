"""Quantization methods of safetensors checkpoints (AWQ, GPTQ, FP8, compressed-tensors FP8) and of float models
quantized at load (FP8, AWQ, GPTQ): how a quantized layer's checkpoint tensors (or a float weight) become one
:class:`~.base.QuantizedMatrix`, and what runs where.

The checkpoint's ``config.json`` ``quantization_config`` names its method (``quant_method``); the engine's
``quantization`` option (:meth:`~sgl_ray.configs.engine_args.EngineArgs.effective_quantization`) agrees with it,
asks for it to be dequantized at load (``"none"``), or, on a float checkpoint, asks for FP8, AWQ or GPTQ at load.
:func:`create_quant_method` then builds the method from :data:`CHECKPOINT_METHODS` (a registry, one parser per
``quant_method``) and checks the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from sgl_ray.errors import ModelLoadError, UnsupportedModelError
from sgl_ray.layers.quantization.base import QuantizedMatrix
from sgl_ray.layers.quantization.fp8 import FP8, Fp8Matrix
from sgl_ray.layers.quantization.int4_formats import awq_matrix, gptq_matrix


def option(name: str) -> str:
    """How errors name the option: ``quantization='awq' (--quantization awq)``."""
    return f"quantization={name!r} (--quantization {name})"


class QuantMethod(ABC):
    """One quantization method of a model, chosen at start.

    Contract: a quantized layer ``prefix`` stores tensors ``prefix.<part>`` (:meth:`is_part`); once :meth:`complete`
    holds for the parts seen, :meth:`build` gives the layer's ``[out, in]`` weight as a :class:`QuantizedMatrix`
    (the loader then hands it to ``prefix.weight``, dequantized to float when ``keep`` is False). A part of an
    already built layer goes to :meth:`late_part`. :meth:`check_device` raises :class:`UnsupportedModelError`,
    naming the option, where the kept encoding cannot run; :meth:`process_loaded` runs once the model is loaded.
    """

    name: ClassVar[str]
    parts: ClassVar[frozenset[str]] = frozenset()
    # parts a layer may have alone (a float layer's input_scale)
    optional: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep  # False: dequantized at load (quantization="none")

    def is_part(self, leaf: str, tensor: torch.Tensor) -> bool:
        return leaf in self.parts

    def complete(self, parts: dict[str, torch.Tensor]) -> bool:
        return False

    def build(self, prefix: str, parts: dict[str, torch.Tensor]) -> QuantizedMatrix:
        raise NotImplementedError(f"{type(self).__name__} reads no checkpoint tensors")

    def late_part(self, name: str, tensor: torch.Tensor) -> None:
        """A part arriving after its layer was built (default: not needed, dropped)."""
        return None

    def incomplete(self, prefix: str, parts: dict[str, torch.Tensor]) -> str:
        """Why the checkpoint ended with only ``parts`` of layer ``prefix``."""
        return f"the {self.name} checkpoint has only {sorted(parts)} of the quantized layer {prefix!r}"

    @abstractmethod
    def check_device(self, device: torch.device) -> None: ...

    def process_loaded(self, model: nn.Module) -> None:
        """After loading (default: nothing)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'kept' if self.keep else 'dequantized at load'})"


def _int4_device_check(name: str, device: torch.device) -> None:
    if device.type not in ("cpu", "cuda"):
        raise UnsupportedModelError(
            f"{option(name)}: INT4 weights run on CPU (torch) and CUDA (Triton), not {device.type}",
            param="quantization",
        )


class AWQMethod(QuantMethod):
    """AutoAWQ "gemm" checkpoints: 4-bit, zero points, groups along the input (``group_size``)."""

    name = "awq"
    parts = frozenset({"qweight", "qzeros", "scales"})

    def __init__(self, group_size: int, keep: bool = True) -> None:
        super().__init__(keep)
        self.group_size = group_size

    @classmethod
    def from_config(cls, config: dict[str, Any], keep: bool) -> AWQMethod:
        bits = config.get("bits", config.get("w_bit", 4))
        version = str(config.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not config.get("zero_point", True):
            raise UnsupportedModelError(
                f"{option('awq')}: only 4-bit AWQ with zero points in the 'gemm' layout is supported, this "
                f"checkpoint has bits={bits}, version={version!r}, zero_point={config.get('zero_point')}",
                param="quantization",
            )
        return cls(int(config.get("group_size", config.get("q_group_size", 128))), keep)

    def complete(self, parts: dict[str, torch.Tensor]) -> bool:
        return self.parts <= parts.keys()

    def build(self, prefix: str, parts: dict[str, torch.Tensor]) -> QuantizedMatrix:
        return awq_matrix(parts["qweight"], parts["qzeros"], parts["scales"], self.group_size)

    def check_device(self, device: torch.device) -> None:
        _int4_device_check(self.name, device)


class GPTQMethod(QuantMethod):
    """AutoGPTQ / GPTQModel checkpoints: 4-bit, zero points (format v1 stores ``zero - 1``), ``g_idx``; act order
    (``desc_act``) needs ``g_idx`` in the checkpoint."""

    name = "gptq"
    parts = frozenset({"qweight", "qzeros", "scales", "g_idx"})
    _needed = frozenset({"qweight", "qzeros", "scales"})

    def __init__(self, group_size: int, desc_act: bool, zero_offset: int, keep: bool = True) -> None:
        super().__init__(keep)
        self.group_size, self.desc_act, self.zero_offset = group_size, desc_act, zero_offset

    @classmethod
    def from_config(cls, config: dict[str, Any], keep: bool) -> GPTQMethod:
        bits = config.get("bits", 4)
        fmt = str(config.get("checkpoint_format", config.get("format", "gptq"))).lower()
        if bits != 4 or fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedModelError(
                f"{option('gptq')}: only 4-bit GPTQ checkpoints (format gptq or gptq_v2) are supported, this one "
                f"has bits={bits}, checkpoint_format={fmt!r}",
                param="quantization",
            )
        zero_offset = 1 if fmt == "gptq" else 0
        return cls(int(config.get("group_size", 128)), bool(config.get("desc_act", False)), zero_offset, keep)

    def complete(self, parts: dict[str, torch.Tensor]) -> bool:
        return self._needed <= parts.keys() and ("g_idx" in parts or not self.desc_act)

    def build(self, prefix: str, parts: dict[str, torch.Tensor]) -> QuantizedMatrix:
        return gptq_matrix(
            parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), self.group_size,
            self.zero_offset,
        )  # fmt: skip

    def late_part(self, name: str, tensor: torch.Tensor) -> None:
        size = self.group_size if self.group_size > 0 else tensor.numel()
        in_order = torch.arange(tensor.numel(), dtype=torch.int32) // size
        if not torch.equal(tensor.to(torch.int32), in_order):
            raise ModelLoadError(
                f"{name}: an act-order g_idx after its layer's other tensors, but the quantization_config says "
                "desc_act=false"
            )

    def incomplete(self, prefix: str, parts: dict[str, torch.Tensor]) -> str:
        if self.desc_act and self._needed <= parts.keys():
            return (
                f"{prefix}: the quantization_config says desc_act=true (act order), which needs the layer's "
                "g_idx (the group of each input column); the checkpoint has none"
            )
        return super().incomplete(prefix, parts)

    def check_device(self, device: torch.device) -> None:
        _int4_device_check(self.name, device)


def check_fp8_device(name: str, device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """FP8 runs on CPUs (weight-only) and on CUDA cards of compute capability 8.9 or more (W8A8); ``capability``
    defaults to the card's."""
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UnsupportedModelError(
            f"{option(name)}: FP8 runs on CPU and CUDA, not {device.type}", param="quantization"
        )
    capability = capability or torch.cuda.get_device_capability(device)
    if tuple(capability) < (8, 9):
        raise UnsupportedModelError(
            f"{option(name)}: FP8 GEMMs need CUDA compute capability 8.9 or more (Ada, Hopper, Blackwell); this "
            f"card has {capability[0]}.{capability[1]}. quantization='none' dequantizes an FP8 checkpoint at load",
            param="quantization",
        )


class FP8CheckpointMethod(QuantMethod):
    """FP8 e4m3 checkpoints: ``weight`` with ``weight_scale`` (per tensor or channel) or ``weight_scale_inv``
    (``block`` = 128x128 blocks); a static ``input_scale`` is not used (activations are scaled per token)."""

    name = "fp8"
    parts = frozenset({"weight", "weight_scale", "weight_scale_inv", "input_scale"})
    optional = frozenset({"input_scale"})

    def __init__(self, block: tuple[int, int] | None, keep: bool = True, name: str = "fp8") -> None:
        super().__init__(keep)
        self.block = block
        self.name = name  # type: ignore[misc]  # "compressed-tensors" for those checkpoints

    @classmethod
    def from_config(cls, config: dict[str, Any], keep: bool) -> FP8CheckpointMethod:
        fmt = str(config.get("fmt", "e4m3")).lower()
        if fmt != "e4m3":
            raise UnsupportedModelError(
                f"{option('fp8')}: only e4m3 FP8 is supported, not {fmt!r}", param="quantization"
            )
        block = config.get("weight_block_size")
        return cls(tuple(block) if block else None, keep)

    @classmethod
    def from_compressed_tensors(cls, config: dict[str, Any], keep: bool) -> FP8CheckpointMethod:
        """compressed-tensors ``float-quantized`` FP8 weights (strategy tensor, channel or block)."""
        blocks = set()
        for group_name, group in (config.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            kind = (weights.get("num_bits"), weights.get("type"), weights.get("strategy"))
            if kind[:2] != (8, "float") or kind[2] not in ("tensor", "channel", "block"):
                raise UnsupportedModelError(
                    f"{option('compressed-tensors')}: only FP8 weights (num_bits 8, type float; strategy tensor, "
                    f"channel or block) are supported; group {group_name!r} has num_bits={kind[0]}, "
                    f"type={kind[1]!r}, strategy={kind[2]!r}",
                    param="quantization",
                )
            if kind[2] == "block":
                blocks.add(tuple(weights.get("block_structure") or (128, 128)))
        if len(blocks) > 1:
            raise UnsupportedModelError(
                f"{option('compressed-tensors')}: one block shape per model, not {sorted(blocks)}",
                param="quantization",
            )
        return cls(blocks.pop() if blocks else None, keep, "compressed-tensors")

    def is_part(self, leaf: str, tensor: torch.Tensor) -> bool:
        return leaf in self.parts and (leaf != "weight" or tensor.dtype == FP8)

    def complete(self, parts: dict[str, torch.Tensor]) -> bool:
        return "weight" in parts and ("weight_scale" in parts or "weight_scale_inv" in parts)

    def build(self, prefix: str, parts: dict[str, torch.Tensor]) -> QuantizedMatrix:
        scale = parts.get("weight_scale_inv", parts.get("weight_scale"))
        return Fp8Matrix.from_checkpoint(parts["weight"], scale, self.block)

    def check_device(self, device: torch.device) -> None:
        check_fp8_device(self.name, device)


class OnlineFP8Method(QuantMethod):
    """``quantization="fp8"`` on a float checkpoint: after loading, every tensor-parallel projection's weight
    becomes FP8 with one scale per output channel (of this shard). Embeddings, the LM head, replicated layers
    (routers, gates) and the model's ``float_layers`` (name suffixes) keep their dtype."""

    name = "fp8"

    def check_device(self, device: torch.device) -> None:
        check_fp8_device(self.name, device)

    @torch.no_grad()
    def process_loaded(self, model: nn.Module) -> None:
        for module, weight in _projections(model):
            _hold(module, weight, Fp8Matrix.from_float(weight.data))


def _projections(model: nn.Module):
    """``(module, weight)`` of every tensor-parallel projection that a method quantizing at load converts: float
    weights, not the model's ``float_layers`` (embeddings, the LM head and replicated layers are no projections)."""
    from sgl_ray.layers.linear import ColumnParallelLinear, RowParallelLinear

    float_layers = tuple(getattr(model, "float_layers", ()))
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        projection = isinstance(module, (ColumnParallelLinear, RowParallelLinear))
        if projection and isinstance(weight, nn.Parameter) and not name.endswith(float_layers):
            yield module, weight


def _hold(module: nn.Module, weight: nn.Parameter, matrix: QuantizedMatrix) -> None:
    from sgl_ray.layers.quantization.weight import QuantizedWeight

    held = QuantizedWeight(weight.shape[0], weight.shape[1], weight.dtype, weight.device)
    held.put(0, matrix)
    del module.weight
    module.weight = held


class OnlineInt4Method(QuantMethod):
    """``quantization="awq"`` or ``"gptq"`` on a float model (a float checkpoint, a GGUF file dequantized first, or
    ``load_format="dummy"``): after loading, every tensor-parallel projection's weight (of this shard) is rounded
    to 4-bit groups (:func:`~.int4_formats.int4_from_float`: AWQ's asymmetric groups, GPTQ's symmetric ones; group
    size 128, or the largest power of two that divides the layer's inputs) and held as that checkpoint format
    would be. No calibration: a calibrated AWQ or GPTQ checkpoint of the same model is more accurate. The same
    layers stay float as with online FP8."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]

    def check_device(self, device: torch.device) -> None:
        _int4_device_check(self.name, device)

    @torch.no_grad()
    def process_loaded(self, model: nn.Module) -> None:
        from sgl_ray.layers.quantization.int4_formats import int4_from_float

        for module, weight in _projections(model):
            _hold(module, weight, int4_from_float(weight.data, self.name))


CHECKPOINT_METHODS: dict[str, Callable[[dict[str, Any], bool], QuantMethod]] = {
    "awq": AWQMethod.from_config,
    "gptq": GPTQMethod.from_config,
    "fp8": FP8CheckpointMethod.from_config,
    "compressed-tensors": FP8CheckpointMethod.from_compressed_tensors,
}
"""``quant_method`` of a checkpoint's ``quantization_config`` → its method's parser (``(config, keep)``)."""


def quantization_config(hf_config: Any) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config`` as a dict, or None."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def checkpoint_quant_method(hf_config: Any) -> str | None:
    """``quant_method`` of the checkpoint's ``quantization_config`` (lower case, ``_`` as ``-``), or None."""
    config = quantization_config(hf_config)
    if not config:
        return None
    return str(config.get("quant_method", "unknown")).lower().replace("_", "-")


def create_quant_method(held: str | None, hf_config: Any, device: torch.device) -> QuantMethod | None:
    """The method for a model whose weights are held as ``held`` (what ``EngineArgs.effective_quantization``
    answered): a checkpoint's own (kept, or dequantized at load when ``held`` is None), online FP8, AWQ or GPTQ for
    a float checkpoint, or None (plain float weights, or GGUF: its loader handles its blocks)."""
    checkpoint = checkpoint_quant_method(hf_config)
    if checkpoint in CHECKPOINT_METHODS and held != "gguf":
        method = CHECKPOINT_METHODS[checkpoint](quantization_config(hf_config) or {}, held is not None)
    elif held == "fp8":
        method = OnlineFP8Method()
    elif held in ("awq", "gptq"):
        method = OnlineInt4Method(held)
    else:
        return None
    if method.keep:
        method.check_device(device)
    return method
