"""A request as the scheduler tracks it.

There is no separate prefill or decode phase: a request has ``fill_ids`` (prompt + tokens generated so far) and
``num_computed`` of them have KV in the pool. Each step computes some of the rest; once all of ``fill_ids`` but
the newest token are computed, the request is decoding (it computes exactly that newest token each step).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from sgl_ray.mem_cache.prefix_hash import block_hashes
from sgl_ray.sampling.params import SamplingParams


class ReqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(msgspec.Struct, frozen=True):
    """``type`` is ``stop`` (EOS, stop token or stop string in ``matched``), ``length`` or ``abort``."""

    type: str
    matched: int | str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "length":
            out["length"] = self.matched
        elif self.type == "stop":
            out["matched"] = self.matched
        if self.message:
            out["message"] = self.message
        return out


@dataclass
class RequestGroup:
    """Siblings of an ``n > 1`` request: one leads the prompt prefill, the others then reuse its cached KV."""

    leader: str | None = None
    prompt_cached: bool = False


class SlotList:
    """A growable int64 array of KV slots (amortised O(1) append)."""

    __slots__ = ("_buf", "_len")

    def __init__(self) -> None:
        self._buf = np.zeros(16, dtype=np.int64)
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> np.ndarray:
        return self.view().copy()

    def __setstate__(
        self, slots: np.ndarray
    ) -> None:  # a fresh, writable buffer (Ray hands back read-only ones)
        self._buf = np.array(slots, dtype=np.int64)
        self._len = len(slots)
        if len(self._buf) == 0:
            self._buf = np.zeros(16, dtype=np.int64)

    def view(self) -> np.ndarray:
        return self._buf[: self._len]

    def extend(self, slots: np.ndarray) -> None:
        need = self._len + len(slots)
        if need > len(self._buf):
            grown = np.zeros(max(need, 2 * len(self._buf)), dtype=np.int64)
            grown[: self._len] = self._buf[: self._len]
            self._buf = grown
        self._buf[self._len : need] = slots
        self._len = need

    def truncate(self, n: int) -> None:
        self._len = min(self._len, n)

    def clear(self) -> None:
        self._len = 0


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int
    eos_token_ids: tuple[int, ...] = ()
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # first prompt position whose logprob is returned; -1: none
    priority: int = 0
    extra_key: str | None = None  # namespace of the prefix cache (e.g. a LoRA adapter)
    lora_name: str | None = None  # LoRA adapter to run with (None: the base model)
    group: RequestGroup | None = None
    arrival: float = field(default_factory=time.monotonic)

    status: ReqStatus = ReqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    kv_slots: SlotList = field(default_factory=SlotList)  # slots of fill_ids[: len(kv_slots)]
    req_pool_idx: int = -1
    cache_node: Any = None  # locked prefix-cache node
    tree_len: int = 0  # leading kv_slots owned by the prefix cache (under cache_node)
    lock_start: int = 0  # sliding-window models: first position of the cache path the request keeps locked
    window_done: int = 0  # sliding-window models: kv_slots[:window_done] are -1 (out of every window, let go)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    admit_seq: int = -1  # admission order, for choosing preemption victims
    num_retractions: int = 0
    finish_reason: FinishReason | None = None
    input_logprob_next: int = 1  # next prompt position whose logprob is still to be collected
    prefix_len_hint: int = 0  # last match length seen by the policy
    in_flight: bool = False  # part of a scheduled batch whose results are not processed yet
    inflight_tokens: int = 0  # tokens being computed by batches in flight
    inflight_samples: int = 0  # tokens those batches will sample (not yet in output_ids)
    inflight_drafts: int = 0  # draft tokens those batches verify (their KV is kept only where accepted)
    lora_slot: int = -1  # runner slot of the adapter while running
    # Structured outputs (scheduler side only; see scheduler.grammar).
    grammar_compile: Any = None  # Future of the compiled grammar
    grammar_wait_since: float = 0.0  # time.monotonic() when its compile was asked for
    grammar: Any = None  # constrained.GrammarMatcher, once compiled and admitted
    jump_tokens: list[int] = field(default_factory=list)  # forced tail of output_ids awaiting verification
    jump_masks: np.ndarray | None = None  # [len(jump_tokens) + 1, W] masks of their rows
    decode_steps: int = 0  # forward steps that produced output tokens
    jump_forward_tokens: int = 0  # output tokens appended by jump-forward (not decoded one per step)
    jump_next: bool = False  # the grammar forced a string while a step ran ahead: wait for the token to jump
    # Speculative decoding (see scheduler.speculation)
    spec_verify_ct: int = 0  # decode steps that verified drafts (steps of a speculating request)
    spec_proposed_drafts: int = 0
    spec_accepted_drafts: int = 0
    # Image inputs (multimodal.MultimodalInputs): prompt_ids then hold each image's key id on its placeholder rows
    multimodal: Any = None

    def prompt_block_hashes(self, block: int) -> list[int]:
        """Chained hashes of the prompt's ``block``-token blocks (see ``mem_cache.prefix_hash``), computed once."""
        cached = self.__dict__.get("_block_hashes")
        if cached is None or cached[0] != block:
            cached = self.__dict__["_block_hashes"] = (
                block,
                block_hashes(self.prompt_ids, block, self.extra_key),
            )
        return cached[1]

    @property
    def model_prompt_ids(self) -> list[int]:
        """The prompt in the model's vocabulary (image key ids back to the placeholder token)."""
        if self.multimodal is None:
            return self.prompt_ids
        cached = self.__dict__.get("_model_prompt_ids")
        if cached is None:
            cached = self.__dict__["_model_prompt_ids"] = self.multimodal.real_ids(self.prompt_ids)
        return cached

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_decoding(self) -> bool:
        """Every token but the last has KV once the batches in flight finish (then one decode step follows). Drafts
        in flight do not count: their KV stays only where they are accepted."""
        return (
            self.num_computed + self.inflight_tokens - self.inflight_drafts
            == self.num_tokens + self.inflight_samples - 1
            and len(self.output_ids) + self.inflight_samples > 0
        )

    @property
    def can_run_ahead(self) -> bool:
        """Whether a decode step may be scheduled while this request's sampling step is still in flight (overlap
        scheduling): its input token is then the one that step samples. Not when that token is surely the last.
        (Constrained requests also need the scheduler's consent: ``Scheduler._can_run_ahead``.)"""
        return self.inflight_samples == 1 and self.sampling.max_new_tokens - len(self.output_ids) > 1

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.sampling.max_new_tokens - len(self.output_ids))

    @property
    def wants_input_logprobs(self) -> bool:
        return (
            self.return_logprob
            and self.logprob_start_len >= 0
            and self.input_logprob_next < len(self.prompt_ids)
        )
