"""Speculative decoding: drafters (NGRAM, a STANDALONE draft model, EAGLE/EAGLE-3 heads) and the verification of
chain drafts.

Turned on with ``Engine(speculative_algorithm="NGRAM" | "STANDALONE" | "EAGLE" | "EAGLE3", ...)``: see
docs/speculative.md. The scheduler side lives in ``sgl_ray.scheduler.speculation`` (drafts, settling verify
results), the runner side here (``worker``: drafting, ``draft_model``: a draft model, ``eagle``: an EAGLE head over
the target's hidden states, ``verify``: acceptance on the device).
"""

from __future__ import annotations

from sgl_ray.speculative.config import ALGORITHMS, SpeculativeConfig
from sgl_ray.speculative.ngram import ngram_drafts

__all__ = ["ALGORITHMS", "SpeculativeConfig", "ngram_drafts"]
