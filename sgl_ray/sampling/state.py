"""Per-slot sampling state: every request's parameters in tensors indexed by ``req_pool_idx``.

The runner admits a request into a slot with :meth:`SamplingState.set_request`, samples with row ``i`` of the batch
reading slot ``slots[i]`` (a gather, never a Python loop over requests), and reports the sampled tokens back with
:meth:`SamplingState.update`. Host-side (numpy) mirrors of a few per-slot flags let the sampler decide which passes
a batch needs without reading device memory.

Invariants:
  * Rows of slots that hold no request carry neutral values (temperature 1, top-k = vocab, no penalties).
  * ``output_counts[s]`` / ``prompt_mask[s]`` are exact for every slot ``s`` whose request uses penalties; rows of
    other slots may hold stale counts, which is harmless because their penalty coefficients are neutral.
  * Padded id columns (stop tokens, logit-bias tokens) point at token 0 with a neutral value, so they can be
    applied with ``scatter_add_`` without a validity mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from sgl_ray.sampling import noise
from sgl_ray.sampling.params import SamplingParams

TokenIds = Sequence[int] | np.ndarray


class BatchPlan(NamedTuple):
    """Which passes a batch needs; computed on the host from per-slot flags, so deciding costs no device sync."""

    all_greedy: bool
    any_greedy: bool
    top_k: bool
    top_p: bool
    min_p: bool
    logit_bias: bool
    min_new_tokens: bool
    repetition: bool
    frequency_presence: bool
    max_top_k: int  # largest enabled top-k among sampled rows; 0 when none
    all_restricted: bool  # every sampled row has a top-k, top-p or min-p filter (its kept set is bounded)

    @property
    def needs_sort(self) -> bool:
        return self.top_k or self.top_p

    @property
    def needs_penalties(self) -> bool:
        return self.repetition or self.frequency_presence

    @property
    def needs_processing(self) -> bool:
        """Whether logits must be modified before argmax / sampling."""
        return self.logit_bias or self.min_new_tokens or self.needs_penalties


_FLAGS = (
    "greedy",
    "top_k",
    "top_p",
    "min_p",
    "logit_bias",
    "min_new_tokens",
    "repetition",
    "frequency_presence",
)


class SamplingState:
    """Sampling parameters and token statistics for ``max_reqs`` request slots over a ``vocab_size`` vocabulary.

    Example::

        >>> st = SamplingState(max_reqs=4, vocab_size=10, device="cpu")
        >>> st.set_request(2, SamplingParams(temperature=0.5, top_k=3), seed=7, eos_token_ids=[0],
        ...                prompt_ids=[1, 2, 3], output_ids=[])
        >>> float(st.temperature[2]), int(st.top_k[2])
        (0.5, 3)
    """

    def __init__(self, max_reqs: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.max_reqs = max_reqs
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        r, dev = max_reqs, self.device

        def f32(v: float) -> torch.Tensor:
            return torch.full((r,), v, dtype=torch.float32, device=dev)

        def i64(v: int) -> torch.Tensor:
            return torch.full((r,), v, dtype=torch.int64, device=dev)

        self.temperature = f32(1.0)  # [R]; 0 for greedy rows
        self.top_p = f32(1.0)  # [R]
        self.top_k = i64(vocab_size)  # [R]; vocab_size when disabled
        self.min_p = f32(0.0)  # [R]
        self.frequency_penalty = f32(0.0)  # [R]
        self.presence_penalty = f32(0.0)  # [R]
        self.repetition_penalty = f32(1.0)  # [R]
        self.seed = i64(0)  # [R] in [0, 2**63)
        self.seed_key = noise.seed_keys(
            self.seed.clone()
        )  # [R] noise.seed_keys(seed), hashed once at admission
        self.greedy = torch.zeros(r, dtype=torch.bool, device=dev)  # [R]
        self.min_new_tokens = i64(0)  # [R]
        self.num_generated = i64(0)  # [R] output tokens so far (including those before a preemption)
        # Tokens masked while num_generated < min_new_tokens: EOS (unless ignore_eos) and stop_token_ids.
        self.stop_ids = torch.zeros(r, 4, dtype=torch.int64, device=dev)  # [R, Ks]
        self.stop_valid = torch.zeros(r, 4, dtype=torch.bool, device=dev)  # [R, Ks]
        # Sparse logit bias: pads are (token 0, +0.0).
        self.bias_ids = torch.zeros(r, 1, dtype=torch.int64, device=dev)  # [R, Kb]
        self.bias_vals = torch.zeros(r, 1, dtype=torch.float32, device=dev)  # [R, Kb]
        # Allocated on the first request that uses penalties.
        self.output_counts: torch.Tensor | None = None  # [R, V] int32
        self.prompt_mask: torch.Tensor | None = None  # [R, V] bool
        self._flags = {name: np.zeros(r, dtype=bool) for name in _FLAGS}  # host mirrors
        self._top_k = np.full(r, vocab_size, dtype=np.int64)  # host mirror of top_k

    # ---- admission ---------------------------------------------------------------------------------------------

    def set_request(
        self,
        slot: int,
        params: SamplingParams,
        seed: int,
        eos_token_ids: Sequence[int],
        prompt_ids: TokenIds,
        output_ids: TokenIds = (),
    ) -> None:
        """Load one request into ``slot``; ``output_ids`` are tokens already generated (resume after preemption).

        ``seed`` is the resolved seed (the request's own, or one the engine drew for it), in ``[0, 2**63)``.
        Raises :class:`~sgl_ray.errors.InvalidRequestError` for bad parameters (checked here, on the host, because
        an out-of-vocabulary id would otherwise surface as a device-side assert).
        """
        params.validate(self.vocab_size)
        v = self.vocab_size
        top_k = v if params.top_k <= 0 else min(params.top_k, v)
        greedy = params.temperature == 0.0 or top_k == 1
        self.temperature[slot] = 0.0 if greedy else params.temperature
        self.top_p[slot] = params.top_p
        self.top_k[slot] = top_k
        self.min_p[slot] = params.min_p
        self.frequency_penalty[slot] = params.frequency_penalty
        self.presence_penalty[slot] = params.presence_penalty
        self.repetition_penalty[slot] = params.repetition_penalty
        self.seed[slot] = seed
        self.seed_key[slot] = int(noise.seed_keys(torch.tensor([seed], dtype=torch.int64))[0])
        self.greedy[slot] = greedy
        self.min_new_tokens[slot] = params.min_new_tokens
        self.num_generated[slot] = len(output_ids)

        stops = sorted(
            set(params.stop_token_ids or []) | (set() if params.ignore_eos else set(eos_token_ids))
        )
        uses_min_new = params.min_new_tokens > 0 and len(stops) > 0
        self._set_stop_ids(slot, stops if uses_min_new else [])
        bias = params.logit_bias or {}
        self._set_bias(slot, bias)

        flags = {
            "greedy": greedy,
            "top_k": top_k < v,
            "top_p": params.top_p < 1.0,
            "min_p": params.min_p > 0.0,
            "logit_bias": bool(bias),
            "min_new_tokens": uses_min_new,
            "repetition": params.repetition_penalty != 1.0,
            "frequency_presence": params.frequency_penalty != 0.0 or params.presence_penalty != 0.0,
        }
        for name, value in flags.items():
            self._flags[name][slot] = value
        self._top_k[slot] = top_k
        if params.needs_penalties:
            self._load_counts(slot, prompt_ids, output_ids)

    def clear_request(self, slot: int) -> None:
        """Return ``slot`` to neutral values; its counts rows are left stale (see the class invariants)."""
        self.set_request(slot, SamplingParams(), seed=0, eos_token_ids=(), prompt_ids=(), output_ids=())

    def update(self, slots: torch.Tensor, next_token_ids: torch.Tensor) -> None:
        """Record one sampled token per row: ``slots`` [B] (distinct), ``next_token_ids`` [B]; no host sync."""
        slots = slots.to(self.device, torch.int64, non_blocking=True)
        tokens = next_token_ids.to(self.device, torch.int64, non_blocking=True)
        self.num_generated.index_add_(
            0, slots, torch.ones(slots.shape, dtype=torch.int64, device=self.device)
        )
        if self.output_counts is not None:
            # Bumped for every row (a B-element scatter); only penalty slots' rows are ever read.
            ones = torch.ones(slots.shape, dtype=torch.int32, device=self.device)
            self.output_counts.index_put_((slots, tokens), ones, accumulate=True)

    # ---- planning ----------------------------------------------------------------------------------------------

    def plan(self, slots: torch.Tensor | np.ndarray) -> BatchPlan:
        """The passes needed by the batch whose rows read ``slots`` (host tensor preferred: no device sync)."""
        idx = slots if isinstance(slots, np.ndarray) else slots.cpu().numpy()
        f = {name: arr[idx] for name, arr in self._flags.items()}
        sampled = ~f["greedy"]
        top_k, top_p, min_p = f["top_k"] & sampled, f["top_p"] & sampled, f["min_p"] & sampled
        return BatchPlan(
            all_greedy=not sampled.any(),
            any_greedy=bool(f["greedy"].any()),
            top_k=bool(top_k.any()),
            top_p=bool(top_p.any()),
            min_p=bool(min_p.any()),
            logit_bias=bool(f["logit_bias"].any()),
            min_new_tokens=bool(f["min_new_tokens"].any()),
            repetition=bool(f["repetition"].any()),
            frequency_presence=bool(f["frequency_presence"].any()),
            max_top_k=int(self._top_k[idx][top_k].max(initial=0)),
            all_restricted=bool((top_k | top_p | min_p)[sampled].all()),
        )

    # ---- internals ---------------------------------------------------------------------------------------------

    def _set_stop_ids(self, slot: int, stops: list[int]) -> None:
        if len(stops) > self.stop_ids.shape[1]:
            self.stop_ids, self.stop_valid = (
                _widen(self.stop_ids, len(stops)),
                _widen(self.stop_valid, len(stops)),
            )
        k = self.stop_ids.shape[1]
        ids = torch.zeros(k, dtype=torch.int64)
        ids[: len(stops)] = torch.tensor(stops, dtype=torch.int64)
        self.stop_ids[slot] = ids.to(self.device, non_blocking=True)
        self.stop_valid[slot] = torch.arange(k, device=self.device) < len(stops)

    def _set_bias(self, slot: int, bias: dict[int, float]) -> None:
        if len(bias) > self.bias_ids.shape[1]:
            self.bias_ids, self.bias_vals = (
                _widen(self.bias_ids, len(bias)),
                _widen(self.bias_vals, len(bias)),
            )
        k = self.bias_ids.shape[1]
        ids = torch.zeros(k, dtype=torch.int64)
        vals = torch.zeros(k, dtype=torch.float32)
        if bias:
            ids[: len(bias)] = torch.tensor([int(t) for t in bias], dtype=torch.int64)
            vals[: len(bias)] = torch.tensor([float(b) for b in bias.values()], dtype=torch.float32)
        self.bias_ids[slot] = ids.to(self.device, non_blocking=True)
        self.bias_vals[slot] = vals.to(self.device, non_blocking=True)

    def _load_counts(self, slot: int, prompt_ids: TokenIds, output_ids: TokenIds) -> None:
        if self.output_counts is None or self.prompt_mask is None:
            shape = (self.max_reqs, self.vocab_size)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        prompt = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64)).to(self.device)
        output = torch.as_tensor(np.asarray(output_ids, dtype=np.int64)).to(self.device)
        self.prompt_mask[slot] = False
        self.prompt_mask[slot, prompt] = True
        self.output_counts[slot] = torch.bincount(output, minlength=self.vocab_size).to(torch.int32)


def _widen(t: torch.Tensor, width: int) -> torch.Tensor:
    """A copy of ``t`` [R, K] widened to the next power of two >= ``width`` columns, padded with zeros."""
    new_k = 1 << (width - 1).bit_length()
    out = torch.zeros(t.shape[0], new_k, dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out
