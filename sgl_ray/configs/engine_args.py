"""The user-facing engine configuration (one flat, frozen dataclass, like SGLang's ``ServerArgs``)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from sgl_ray.errors import InvalidRequestError, UnsupportedModelError

SchedulePolicyName = Literal["fcfs", "lpm", "dfs-weight", "priority"]
QUANTIZATION_METHODS = ("awq", "gptq", "fp8", "compressed-tensors", "gguf", "none")
CHECKPOINT_QUANT_METHODS = ("awq", "gptq", "fp8", "compressed-tensors")
"""``quant_method`` values of a safetensors checkpoint's ``quantization_config`` that load (kept, or dequantized at
load with ``quantization="none"``): see :mod:`sgl_ray.layers.quantization.methods`."""
QUANTIZED_AT_LOAD = ("fp8", "awq", "gptq")
"""``quantization`` values that quantize a float model at load (online FP8; INT4 rounded to nearest in AWQ's or
GPTQ's form)."""
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,  # the model's dtype
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
"""``kv_cache_dtype`` values (SGLang's names) -> the KV pool's element type (see docs/quantization.md)."""
GGUF_KEPT_QUANTIZED_BY_DEFAULT = False
"""Whether ``quantization`` unset keeps a GGUF file quantized on a CPU. Off: on the 2-core CPU of
docs/benchmarks.md (2026-12-07) the kept blocks took 1/6.7 of the memory but decoded at batch 1 at 0.27x the speed."""


@dataclass(frozen=True)
class EngineArgs:
    """Every knob of an engine. ``None`` means "pick a sensible default for the device".

    Example::

        >>> args = EngineArgs(model_path="/models/smollm2", max_total_tokens=4096, schedule_policy="lpm")
        >>> args.schedule_policy
        'lpm'
    """

    model_path: str | None = field(
        default=None, metadata={"help": "HF dir, hub id or .gguf; default SmolLM2"}
    )
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "tokenizer location (default: the model)"}
    )
    revision: str | None = field(default=None, metadata={"help": "hub revision"})
    dtype: str = field(default="auto", metadata={"help": "auto|float32|bfloat16|float16"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda|cuda:N"})
    context_length: int | None = field(default=None, metadata={"help": "override the model's context length"})
    page_size: int = field(default=1, metadata={"help": "tokens per KV page"})
    max_total_tokens: int | None = field(default=None, metadata={"help": "KV pool size in tokens"})
    mem_fraction_static: float | None = field(
        default=None,
        metadata={"help": "fraction of memory for weights+KV (GPU: of the card; CPU: of RAM for KV)"},
    )
    max_running_requests: int | None = field(
        default=None, metadata={"help": "max concurrent requests in a batch"}
    )
    max_prefill_tokens: int = field(
        default=16384, metadata={"help": "max new prompt tokens admitted per step"}
    )
    chunked_prefill_size: int | None = field(
        default=None, metadata={"help": "prefill tokens per step per batch (-1 disables chunking)"}
    )
    enable_mixed_chunk: bool | None = field(
        default=None,
        metadata={
            "help": "prefill chunks and decodes in the same steps (default: on for CPU; off on CUDA, where "
            "prefill and decode steps take turns so decode steps replay CUDA graphs)"
        },
    )
    schedule_policy: str = field(default="fcfs", metadata={"help": "fcfs|lpm|dfs-weight|priority"})
    disable_radix_cache: bool = field(default=False, metadata={"help": "turn the prefix cache off"})
    disable_hybrid_swa_memory: bool = field(
        default=False,
        metadata={
            "help": "sliding-window models: keep the KV that every window has left (default: let it go)"
        },
    )
    swa_full_tokens_ratio: float = field(
        default=0.8,
        metadata={
            "help": "models mixing full and sliding-window layers: tokens of the windowed layers' KV pool relative "
            "to the full layers' pool (the memory budget is split between them)"
        },
    )
    attention_backend: str | None = field(
        default=None,
        metadata={"help": "torch (CPU default) | triton (GPU default) | flashinfer (GPU, optional package)"},
    )
    triton_attention_num_kv_splits: int | None = field(
        default=None,
        metadata={
            "help": "Triton decode attention: KV splits per request and KV head, a power of two up to 64 "
            "(default: chosen per step from the batch and the longest sequence, or from the context length "
            "for a CUDA graph)"
        },
    )
    disable_cuda_graph: bool = field(default=False, metadata={"help": "run decode eagerly on CUDA"})
    cuda_graph_max_bs: int = field(
        default=256,
        metadata={
            "help": "largest decode batch captured in a CUDA graph (token rows: a speculative verify step of "
            "chains replays them with a row per token)"
        },
    )
    disable_overlap_schedule: bool = field(
        default=False, metadata={"help": "build each step only after the previous one finished"}
    )
    load_format: str = field(
        default="auto", metadata={"help": "auto (the model's files) | dummy (random weights, for benchmarks)"}
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "weights held quantized (default: as the checkpoint's quantization_config says, else float): "
            "awq | gptq (INT4 checkpoints, or a float model rounded to INT4 at load; CPU torch, CUDA Triton) | fp8 (an FP8 checkpoint, or a float one "
            "quantized at load; CPU weight-only, CUDA W8A8 on compute capability >= 8.9) | compressed-tensors "
            "(its FP8 checkpoints) | gguf (a GGUF file's blocks decoded inside each matmul; CPU) | none "
            "(dequantize to --dtype at load)"
        },
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata={
            "help": "what the KV cache stores: auto (the model's dtype) | fp8_e4m3 | fp8_e5m2 (one byte per value, "
            "twice the tokens of a 16-bit cache; per-layer scales from the checkpoint's k_scale/v_scale, else 1.0)"
        },
    )
    grammar_backend: str = field(default="xgrammar", metadata={"help": "structured-output grammar backend"})
    grammar_compile_timeout: float = field(
        default=300.0,
        metadata={
            "help": "seconds a request waits for its grammar to compile before it fails (the compile goes on, and "
            "its result is cached for the next request with the same grammar)"
        },
    )
    disable_jump_forward: bool | None = field(
        default=None,
        metadata={
            "help": "decode grammar-forced spans token by token (default: jump-forward on for CPU; off on CUDA, "
            "where its extend steps run without CUDA graphs and cost more than the decode steps they save)"
        },
    )
    random_seed: int | None = field(default=None, metadata={"help": "seed for requests that give none"})
    skip_tokenizer_init: bool = field(default=False, metadata={"help": "token ids in and out only"})
    num_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads on CPU"})
    tp_size: int = field(default=1, metadata={"help": "tensor-parallel shards (Ray actors)"})
    pp_size: int = field(default=1, metadata={"help": "pipeline-parallel stages (Ray actors)"})
    dp_size: int = field(default=1, metadata={"help": "data-parallel engine groups"})
    ep_size: int = field(
        default=1,
        metadata={
            "help": "expert-parallel groups within the tensor-parallel shards (MoE models): each holds "
            "num_experts / ep_size experts; must divide tp_size"
        },
    )
    moe_a2a_backend: str = field(
        default="none",
        metadata={
            "help": "how MoE layers move tokens between expert-parallel shards: none (every shard holds every "
            "token after tensor-parallel attention; experts' partial sums are all-reduced) | all_to_all (each shard "
            "routes a slice of the tokens and sends them to their experts' shards and back; needs ep_size == "
            "tp_size)"
        },
    )
    moe_runner_backend: str = field(
        default="auto", metadata={"help": "MoE expert kernels: auto | triton (CUDA) | torch"}
    )
    use_ray: bool = field(default=False, metadata={"help": "run in Ray actors even at size 1"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: local)"})
    placement_timeout: float = field(
        default=600.0,
        metadata={
            "help": "seconds to wait for a busy Ray cluster to place the shards' placement group (a layout the "
            "cluster can never hold fails at once)"
        },
    )
    enable_lora: bool = field(
        default=False, metadata={"help": "allocate LoRA adapter slots (implied by --lora-paths)"}
    )
    lora_paths: tuple[str, ...] | None = field(
        default=None, metadata={"help": "LoRA adapters to load at start: name=path ...", "nargs": "*"}
    )
    max_loras_per_batch: int = field(
        default=8, metadata={"help": "LoRA adapter slots (distinct adapters per batch)"}
    )
    max_lora_rank: int | None = field(
        default=None,
        metadata={"help": "largest LoRA rank accepted (default: the largest of --lora-paths, or 16)"},
    )
    lora_backend: str | None = field(
        default=None,
        metadata={"help": "torch (CPU default) | triton (GPU default)"},
    )
    lora_allow_pickle: bool = field(
        default=False,
        metadata={"help": "also load LoRA adapters saved as pickles (adapter_model.bin)"},
    )
    tool_call_parser: str | None = field(
        default=None,
        metadata={
            "help": "the model's tool-call format: llama3 | qwen25 | hermes | mistral | deepseekv3 | pythonic "
            "(default: detected from the chat template, else hermes)"
        },
    )
    reasoning_parser: str | None = field(
        default=None,
        metadata={"help": "split reasoning from the answer: deepseek-r1 | qwen3 | think (default: off)"},
    )
    # Speculative decoding (docs/speculative.md; names and meanings as SGLang's)
    speculative_algorithm: str | None = field(
        default=None,
        metadata={
            "help": "NGRAM (drafts from the request's own tokens) | STANDALONE (a small draft model) | EAGLE | "
            "EAGLE3 (an EAGLE head over the target's hidden states; EAGLE without a draft path: a DeepSeek-V3 "
            "target's MTP layer) | NEXTN (= EAGLE)"
        },
    )
    speculative_draft_model_path: str | None = field(
        default=None,
        metadata={
            "help": "STANDALONE: the draft model (same vocabulary as the target); EAGLE/EAGLE3: the head "
            "(EAGLE: unset for a DeepSeek-V3 target's MTP layer)"
        },
    )
    speculative_num_steps: int | None = field(
        default=None,
        metadata={"help": "STANDALONE, EAGLE, EAGLE3: draft tokens per verify step (default 3)"},
    )
    speculative_eagle_topk: int | None = field(
        default=None, metadata={"help": "children per expanded draft node: 1 chains (default), more trees"}
    )
    speculative_num_draft_tokens: int | None = field(
        default=None,
        metadata={"help": "tokens per verify step: the last accepted one + the drafts (default: NGRAM 8)"},
    )
    speculative_ngram_min_match_window_size: int = field(
        default=1, metadata={"help": "NGRAM: shortest suffix of the tokens looked up"}
    )
    speculative_ngram_max_match_window_size: int = field(
        default=12, metadata={"help": "NGRAM: longest suffix of the tokens looked up"}
    )
    speculative_ngram_min_bfs_breadth: int = field(
        default=1, metadata={"help": "NGRAM trees: children per node kept after the longest match"}
    )
    speculative_ngram_max_bfs_breadth: int | None = field(
        default=None,
        metadata={
            "help": "NGRAM trees: children per node kept after the shortest match; 1: chains from the request's "
            "own tokens (default 10; 1 with the flashinfer attention backend)"
        },
    )
    speculative_ngram_match_type: str = field(
        default="BFS",
        metadata={"help": "NGRAM trees: BFS (most recent continuations first) | PROB (most frequent first)"},
    )
    speculative_ngram_branch_length: int = field(
        default=18, metadata={"help": "NGRAM trees: the longest n-gram the cache keeps"}
    )
    speculative_ngram_capacity: int = field(
        default=1_000_000,
        metadata={
            "help": "NGRAM trees: n-gram cache size in trie nodes, ~160 bytes each (least recent dropped)"
        },
    )

    def __post_init__(self) -> None:
        def bad(param: str, msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param}: {msg}", param=param)

        if self.page_size < 1:
            raise bad("page_size", "must be >= 1")
        if self.max_total_tokens is not None and self.max_total_tokens < 2 * self.page_size:
            raise bad("max_total_tokens", "must hold at least two pages")
        if self.mem_fraction_static is not None and not (0.0 < self.mem_fraction_static < 1.0):
            raise bad("mem_fraction_static", "must be in (0, 1)")
        if not (0.0 < self.swa_full_tokens_ratio <= 1.0):
            raise bad("swa_full_tokens_ratio", "must be in (0, 1]")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise bad("max_running_requests", "must be >= 1")
        if self.max_prefill_tokens < 1:
            raise bad("max_prefill_tokens", "must be >= 1")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size == 0:
            raise bad("chunked_prefill_size", "use -1 to disable chunking")
        for name in ("tp_size", "pp_size", "dp_size", "ep_size"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.tp_size % self.ep_size:
            raise bad("ep_size", f"must divide tp_size ({self.tp_size}), got {self.ep_size}")
        if self.moe_a2a_backend not in ("none", "all_to_all"):
            raise bad("moe_a2a_backend", "must be 'none' or 'all_to_all'")
        if self.moe_a2a_backend == "all_to_all" and self.ep_size != self.tp_size:
            raise bad(
                "moe_a2a_backend", f"all_to_all needs ep_size == tp_size ({self.ep_size} != {self.tp_size})"
            )
        if self.moe_runner_backend not in ("auto", "triton", "torch"):
            raise bad("moe_runner_backend", "must be 'auto', 'triton' or 'torch'")
        splits = self.triton_attention_num_kv_splits
        if splits is not None and not (1 <= splits <= 64 and splits & (splits - 1) == 0):
            raise bad("triton_attention_num_kv_splits", f"must be a power of two from 1 to 64, got {splits}")
        if self.cuda_graph_max_bs < 1:
            raise bad("cuda_graph_max_bs", "must be >= 1")
        if self.grammar_compile_timeout <= 0:
            raise bad("grammar_compile_timeout", "must be > 0")
        if self.placement_timeout <= 0:
            raise bad("placement_timeout", "must be > 0")
        if self.load_format not in ("auto", "dummy"):
            raise bad("load_format", "must be 'auto' or 'dummy'")
        if self.quantization not in (None, *QUANTIZATION_METHODS):
            raise bad("quantization", f"must be one of {QUANTIZATION_METHODS}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad(
                "kv_cache_dtype",
                f"unknown value {self.kv_cache_dtype!r} (have: {', '.join(KV_CACHE_DTYPES)})",
            )
        if isinstance(self.lora_paths, dict):
            object.__setattr__(self, "lora_paths", tuple(f"{k}={v}" for k, v in self.lora_paths.items()))
        elif self.lora_paths is not None:
            object.__setattr__(self, "lora_paths", tuple(self.lora_paths))
        if self.max_loras_per_batch < 1:
            raise bad("max_loras_per_batch", "must be >= 1")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise bad("max_lora_rank", "must be >= 1")
        if self.schedule_policy not in get_args(SchedulePolicyName):
            raise bad("schedule_policy", f"must be one of {get_args(SchedulePolicyName)}")
        if self.tool_call_parser is not None:
            from sgl_ray.function_call.registry import TOOL_CALL_PARSERS

            if self.tool_call_parser not in TOOL_CALL_PARSERS:
                raise bad("tool_call_parser", f"must be one of {sorted(TOOL_CALL_PARSERS)}")
        if self.reasoning_parser is not None:
            from sgl_ray.reasoning import REASONING_PARSERS

            if self.reasoning_parser not in REASONING_PARSERS:
                raise bad("reasoning_parser", f"must be one of {sorted(REASONING_PARSERS)}")
        if self.speculative_algorithm is not None:
            from sgl_ray.speculative.config import SpeculativeConfig

            SpeculativeConfig.from_args(self)  # raises on a bad or unsupported combination

    @property
    def uses_ray(self) -> bool:
        """Whether the engine runs in Ray actors (any parallelism, or asked for)."""
        return self.use_ray or self.tp_size * self.pp_size * self.dp_size > 1

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_paths)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def effective_chunked_prefill_size(self, device: torch.device) -> int | None:
        """Prefill tokens per step, or None when chunking is off."""
        if self.chunked_prefill_size is None:
            return 8192 if device.type == "cuda" else 1024
        return None if self.chunked_prefill_size < 0 else self.chunked_prefill_size

    def effective_mixed_chunk(self, device: torch.device) -> bool:
        return self.enable_mixed_chunk if self.enable_mixed_chunk is not None else device.type != "cuda"

    def effective_jump_forward(self, device: torch.device) -> bool:
        return (
            not self.disable_jump_forward if self.disable_jump_forward is not None else device.type != "cuda"
        )

    def kv_cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV pool's element type for a model computing in ``model_dtype``.

        >>> EngineArgs(kv_cache_dtype="fp8_e4m3").kv_cache_torch_dtype(torch.bfloat16)
        torch.float8_e4m3fn
        """
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype

    def effective_quantization(
        self, device: torch.device, weight_format: str, checkpoint_method: str | None = None
    ) -> str | None:
        """How the weights are held: ``"gguf"`` (a GGUF file's blocks, decoded inside each matmul), a safetensors
        checkpoint's own ``quant_method`` (``checkpoint_method``: ``"awq"``, ``"gptq"``, ``"fp8"``,
        ``"compressed-tensors"``), ``"fp8"``, ``"awq"`` or ``"gptq"`` for a float model (a float checkpoint, a GGUF
        file dequantized first, ``load_format="dummy"``) quantized at load, or None (``dtype`` weights,
        dequantized at load where the file is quantized: see :data:`GGUF_KEPT_QUANTIZED_BY_DEFAULT`). A method the
        checkpoint does not have, or cannot have here, raises :class:`UnsupportedModelError` naming the option."""
        option = f"quantization={self.quantization!r} (--quantization {self.quantization})"
        if checkpoint_method is not None and weight_format != "gguf":
            return self._checkpoint_quantization(checkpoint_method, weight_format, option)
        if self.quantization in QUANTIZED_AT_LOAD:
            return self.quantization
        if self.quantization in CHECKPOINT_QUANT_METHODS:
            raise UnsupportedModelError(
                f"{option} needs a checkpoint quantized with {self.quantization} (a config.json quantization_config "
                f"with quant_method {self.quantization!r}); this model has none. quantization='fp8', 'awq' or 'gptq' "
                "quantizes a float model at load",
                param="quantization",
            )
        if self.quantization == "none" or (self.quantization is None and not GGUF_KEPT_QUANTIZED_BY_DEFAULT):
            return None
        explicit = self.quantization == "gguf"
        if weight_format != "gguf":
            if explicit:
                raise UnsupportedModelError(
                    f"quantization='gguf' needs a .gguf model file, not {weight_format}", param="quantization"
                )
            return None
        if device.type != "cpu":
            if explicit:
                raise UnsupportedModelError(
                    "quantization='gguf' (GGUF blocks decoded inside each matmul) runs on CPU only for now; "
                    f"on {device.type} use quantization='none' to dequantize the file at load",
                    param="quantization",
                )
            return None
        return "gguf"

    def _checkpoint_quantization(self, method: str, weight_format: str, option: str) -> str | None:
        """:meth:`effective_quantization` of a checkpoint whose quantization_config says ``method``."""
        if method not in CHECKPOINT_QUANT_METHODS:
            raise UnsupportedModelError(
                f"the checkpoint's quantization_config has quant_method {method!r}, which is not supported "
                f"(quantization supports {', '.join(CHECKPOINT_QUANT_METHODS)})",
                param="quantization",
            )
        if self.quantization == "none":
            return None  # dequantized at load (with load_format="dummy": float weights anyway)
        if weight_format == "dummy":
            raise UnsupportedModelError(
                f"load_format='dummy' fills float weights and cannot make up the {method} layers of this "
                "checkpoint; pass quantization='none' to run it in float",
                param="quantization",
            )
        fp8_compressed = self.quantization == "fp8" and method == "compressed-tensors"
        if self.quantization in (None, method) or fp8_compressed:
            return method
        raise UnsupportedModelError(
            f"{option} does not match the checkpoint, whose config.json quantization_config has quant_method "
            f"{method!r}: pass quantization={method!r}, leave it unset, or pass 'none' to dequantize at load",
            param="quantization",
        )

    def replace(self, **changes: Any) -> EngineArgs:
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add ``--model-path``-style options for every field."""
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", default=f.default, help=help_text)
                continue
            if f.type == "bool | None":  # --flag / --no-flag, unset: the default for the device
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
                continue
            kind = str if "str" in str(f.type) else float if "float" in str(f.type) else int
            nargs = f.metadata.get("nargs")
            parser.add_argument(
                flag, type=kind, default=f.default, help=help_text, **({"nargs": nargs} if nargs else {})
            )

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})
