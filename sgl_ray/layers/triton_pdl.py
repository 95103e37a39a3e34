"""Programmatic dependent launch (PDL, Hopper and newer) for the Triton kernels of a decode step.

Normally a kernel starts only once the one before it in the stream has finished, and at batch 1 a decode step is
~400 short kernels, each paying its ramp-up and tail. A kernel launched with ``launch_pdl`` may be scheduled while
its predecessor still runs, as soon as every program of the predecessor has called ``gdc_launch_dependents``.
The contract every such kernel keeps: it calls ``gdc_wait`` (which returns once the predecessor has finished and
its writes are visible) before it reads or writes any buffer another kernel touches: activations, the KV pool,
and any output buffer, which the allocator may just have taken back from a kernel still running. Only work on
data that no kernel still running writes may come first: the GEMV streams its first weight tiles before it
waits, and decode attention reads the step's index arrays (and hybrid pools' slot map, ``full_to_swa``), which
host-to-device copies and the map's writes fill before the forward pass's first kernel (launched plainly, so it starts only once they are done; every dependent launch after it
starts later), and, for one or two short requests, the keys and values that earlier steps cached (all but this
step's own token).

Measured on an H200 (one decode layer chain of the 8B shape at batch 1, CUDA graphs): RMSNorm, GEMVs and
SiLU-and-mul all launched this way took 3.95 ms against 4.13 ms without, and 4.24 ms with cuBLAS GEMMs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@functools.cache
def _device_supports(index: int) -> bool:
    has_gdc = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    return has_gdc and torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL (a CUDA device of compute capability 9.0 or newer)."""
    if t.device.type != "cuda":  # Triton's CPU interpreter
        return False
    return _device_supports(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_args(pdl: bool) -> dict:
    """Extra launch keywords of a kernel that takes ``USE_PDL=pdl``."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """Wait for the previous kernel, then let the next one launch. Call before touching shared buffers."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
