"""The scheduler's settings (built from ``EngineArgs`` by ``sgl_ray.entrypoints.core.scheduler_config``)."""

from __future__ import annotations

from dataclasses import dataclass

from sgl_ray.speculative.config import SpeculativeConfig


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int
    max_reqs: int
    context_length: int
    page_size: int = 1
    max_running_requests: int = 256
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = 1024
    policy: str = "fcfs"
    enable_prefix_cache: bool = True
    overlap: bool = False  # schedule decode steps of requests whose previous step is still in flight
    defer_grammar_masks: bool = False  # with overlap: constrained requests too, their masks filled later
    mixed_chunks: bool = True  # prefill chunks and decodes share steps (else they alternate, one kind a step)
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001
    max_loras_per_batch: int = 0  # LoRA adapter slots; 0: LoRA off
    vocab_size: int = 0  # 0: the tokenizer's
    grammar_backend: str = "xgrammar"
    grammar_compile_timeout: float = 300.0  # seconds a request may wait for its grammar's compile
    enable_jump_forward: bool = True
    speculative: SpeculativeConfig | None = None  # see scheduler.speculation; None: off
    kv_window: int | None = None  # every layer attends within this window: KV out of it is let go of
    # Hybrid KV pools: the windowed layers' own slots (incl. the reserved page); kv_window is then their window
    kv_swa_slots: int = 0
