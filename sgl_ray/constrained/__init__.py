"""Structured outputs: grammar backends (xgrammar by default) and the compile cache.

The scheduler side (matchers of requests, masks in the step plan, jump-forward) is ``sgl_ray.scheduler.grammar``;
the sampler applies the masks (``sgl_ray.sampling.bitmask``).
"""

from __future__ import annotations

from sgl_ray.constrained.base import (
    GRAMMAR_KINDS,
    GrammarBackend,
    GrammarMatcher,
    GrammarSpec,
    bitmask_width,
    create_grammar_backend,
)
from sgl_ray.constrained.manager import GrammarManager

__all__ = [
    "GRAMMAR_KINDS",
    "GrammarBackend",
    "GrammarManager",
    "GrammarMatcher",
    "GrammarSpec",
    "bitmask_width",
    "create_grammar_backend",
]
