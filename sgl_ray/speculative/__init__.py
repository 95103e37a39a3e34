"""Speculative decoding: drafters (NGRAM, a STANDALONE draft model) and the verification of chain drafts.

Turned on with ``Engine(speculative_algorithm="NGRAM" | "STANDALONE", ...)``: see docs/speculative.md. The
scheduler side lives in ``sgl_ray.scheduler.speculation`` (drafts, settling verify results), the runner side
here (``worker``: drafting with a draft model, ``verify``: acceptance on the device).
"""

from __future__ import annotations

from sgl_ray.speculative.config import ALGORITHMS, SpeculativeConfig
from sgl_ray.speculative.ngram import ngram_drafts

__all__ = ["ALGORITHMS", "SpeculativeConfig", "ngram_drafts"]
