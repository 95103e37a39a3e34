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
from sgl_ray.transfer import to_device

TokenIds = Sequence[int] | np.ndarray


class Admission(NamedTuple):
    """A request entering a slot (see :meth:`SamplingState.set_request`)."""

    slot: int
    params: SamplingParams
    seed: int
    eos_token_ids: Sequence[int]
    prompt_ids: TokenIds
    output_ids: TokenIds = ()


_NEUTRAL = SamplingParams()


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
        self.set_requests([Admission(slot, params, seed, eos_token_ids, prompt_ids, output_ids)])

    def set_requests(self, admissions: Sequence[Admission]) -> None:
        """Load several requests at once (distinct slots): one device write per field for all of them, from
        pinned memory, so admitting a batch never waits for the step in flight. Every request's parameters are
        checked before anything is written."""
        if not admissions:
            return
        v = self.vocab_size
        for a in admissions:
            a.params.validate(v)
        n = len(admissions)
        slots = np.fromiter((a.slot for a in admissions), dtype=np.int64, count=n)
        top_k = np.array([v if a.params.top_k <= 0 else min(a.params.top_k, v) for a in admissions], np.int64)
        greedy = np.array([a.params.temperature == 0.0 for a in admissions]) | (top_k == 1)
        floats = np.array(
            [
                (
                    a.params.temperature,
                    a.params.top_p,
                    a.params.min_p,
                    a.params.frequency_penalty,
                    a.params.presence_penalty,
                    a.params.repetition_penalty,
                )
                for a in admissions
            ],
            dtype=np.float32,
        ).T  # [6, n]
        floats[0][greedy] = 0.0
        seeds = np.fromiter((a.seed for a in admissions), dtype=np.int64, count=n)
        ints = np.stack(
            [
                top_k,
                seeds,
                noise.seed_keys(torch.from_numpy(seeds)).numpy(),
                np.fromiter((a.params.min_new_tokens for a in admissions), np.int64, n),
                np.fromiter((len(a.output_ids) for a in admissions), np.int64, n),
            ]
        )  # [5, n]
        stops = [
            sorted(
                set(a.params.stop_token_ids or []) | (set() if a.params.ignore_eos else set(a.eos_token_ids))
            )
            for a in admissions
        ]
        stops = [
            s if a.params.min_new_tokens > 0 and s else [] for s, a in zip(stops, admissions, strict=True)
        ]
        biases = [a.params.logit_bias or {} for a in admissions]
        self._ensure_width(max(map(len, stops)), max(map(len, biases)))
        ks, kb = self.stop_ids.shape[1], self.bias_ids.shape[1]
        stop_ids = np.zeros((n, ks), dtype=np.int64)
        stop_valid = np.zeros((n, ks), dtype=bool)
        bias_ids = np.zeros((n, kb), dtype=np.int64)
        bias_vals = np.zeros((n, kb), dtype=np.float32)
        for i, (st, bias) in enumerate(zip(stops, biases, strict=True)):
            stop_ids[i, : len(st)], stop_valid[i, : len(st)] = st, True
            bias_ids[i, : len(bias)] = [int(t) for t in bias]
            bias_vals[i, : len(bias)] = [float(b) for b in bias.values()]

        dev = self._to_device
        idx = dev(slots)
        f, q = dev(floats), dev(ints)
        for row, t in enumerate(
            (
                self.temperature,
                self.top_p,
                self.min_p,
                self.frequency_penalty,
                self.presence_penalty,
                self.repetition_penalty,
            )
        ):
            t[idx] = f[row]
        for row, t in enumerate(
            (self.top_k, self.seed, self.seed_key, self.min_new_tokens, self.num_generated)
        ):
            t[idx] = q[row]
        self.greedy[idx] = dev(greedy)
        self.stop_ids[idx], self.stop_valid[idx] = dev(stop_ids), dev(stop_valid)
        self.bias_ids[idx], self.bias_vals[idx] = dev(bias_ids), dev(bias_vals)

        flags = {
            "greedy": greedy,
            "top_k": top_k < v,
            "top_p": floats[1] < 1.0,
            "min_p": floats[2] > 0.0,
            "logit_bias": np.array([bool(b) for b in biases]),
            "min_new_tokens": np.array([bool(st) for st in stops]),
            "repetition": floats[5] != 1.0,
            "frequency_presence": (floats[3] != 0.0) | (floats[4] != 0.0),
        }
        for name, values in flags.items():
            self._flags[name][slots] = values
        self._top_k[slots] = top_k
        for a in admissions:
            if a.params.needs_penalties:
                self._load_counts(a.slot, a.prompt_ids, a.output_ids)

    def clear_request(self, slot: int) -> None:
        """Return ``slot`` to neutral values; its counts rows are left stale (see the class invariants)."""
        self.clear_requests([slot])

    def clear_requests(self, slots: Sequence[int]) -> None:
        self.set_requests([Admission(s, _NEUTRAL, 0, (), (), ()) for s in slots])

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        return to_device(host, self.device)

    def update(
        self, slots: torch.Tensor, next_token_ids: torch.Tensor, emitted: torch.Tensor | None = None
    ) -> None:
        """Record sampled tokens, no host sync: row ``i``'s ``next_token_ids[i]`` to slot ``slots[i]`` (both [B]).
        Without ``emitted`` every row once, slots distinct; with it ([B] bool) only the rows where it is set, and a
        slot may have several (a speculative verify entry's emitted tokens)."""
        slots = slots.to(self.device, torch.int64, non_blocking=True)
        tokens = next_token_ids.to(self.device, torch.int64, non_blocking=True)
        if emitted is None:
            n = torch.ones(slots.shape, dtype=torch.int64, device=self.device)
        else:
            n = emitted.to(self.device, torch.int64, non_blocking=True)
        self.num_generated.index_add_(0, slots, n)
        if self.output_counts is not None:
            # Bumped for every row (a B-element scatter); only penalty slots' rows are ever read.
            self.output_counts.index_put_((slots, tokens), n.to(torch.int32), accumulate=True)

    # ---- planning ----------------------------------------------------------------------------------------------

    def greedy_slots(self, slots: np.ndarray) -> np.ndarray:
        """[B] bool: whether each slot's request is greedy (read on the host, no device sync)."""
        return self._flags["greedy"][slots]

    def reads_output(self, slots: np.ndarray) -> np.ndarray:
        """[B] bool: whether each slot's sampling depends on the tokens it generated (penalties, ``min_new_tokens``);
        read on the host."""
        f = self._flags
        return (f["repetition"] | f["frequency_presence"] | f["min_new_tokens"])[slots]

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

    def _ensure_width(self, stops: int, biases: int) -> None:
        """Widen the stop-id and logit-bias columns to hold ``stops`` and ``biases`` entries per slot."""
        if stops > self.stop_ids.shape[1]:
            self.stop_ids, self.stop_valid = _widen(self.stop_ids, stops), _widen(self.stop_valid, stops)
        if biases > self.bias_ids.shape[1]:
            self.bias_ids, self.bias_vals = _widen(self.bias_ids, biases), _widen(self.bias_vals, biases)

    def _load_counts(self, slot: int, prompt_ids: TokenIds, output_ids: TokenIds) -> None:
        """The slot's prompt-token mask and output-token counts (no device sync: scatters, not a bincount)."""
        if self.output_counts is None or self.prompt_mask is None:
            shape = (self.max_reqs, self.vocab_size)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        prompt = self._to_device(np.asarray(prompt_ids, dtype=np.int64))
        output = self._to_device(np.asarray(output_ids, dtype=np.int64))
        # index_fill_, not ``mask[slot, prompt] = True``: that copies the value to the device from pageable memory
        self.prompt_mask[slot].fill_(False).index_fill_(0, prompt, True)
        self.output_counts[slot] = 0
        self.output_counts[slot].index_add_(
            0, output, torch.ones(output.shape, dtype=torch.int32, device=self.device)
        )


def _widen(t: torch.Tensor, width: int) -> torch.Tensor:
    """A copy of ``t`` [R, K] widened to the next power of two >= ``width`` columns, padded with zeros."""
    new_k = 1 << (width - 1).bit_length()
    out = torch.zeros(t.shape[0], new_k, dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out
