"""Speculative decoding settings: SGLang's option names, checked once at engine start.

``speculative_num_draft_tokens`` counts the tokens one verify step feeds the target model for a request: the last
accepted token plus the drafts (SGLang's meaning; with a chain, ``speculative_eagle_topk == 1``, it is
``speculative_num_steps + 1`` for a draft model). A request therefore proposes at most ``num_draft_tokens - 1``
drafts per step.

With ``speculative_eagle_topk`` > 1 (a draft model or an EAGLE head) the drafts form a tree
(``speculative.tree``): ``num_steps`` deep, ``num_draft_tokens - 1`` nodes (default ``num_steps * topk``), at most
``topk + (num_steps - 1) * topk**2`` (every candidate the drafter scores).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sgl_ray.errors import InvalidRequestError, UnsupportedFeatureError

logger = logging.getLogger(__name__)

ALGORITHMS = ("NGRAM", "STANDALONE", "EAGLE", "EAGLE3")
"""Drafters that exist (SGLang's names). ``NEXTN`` is SGLang's alias of ``EAGLE`` (for DeepSeek's MTP layer)."""
_ALIASES = {"NEXTN": "EAGLE"}
_DEFAULT_NGRAM_DRAFT_TOKENS = 8
_DEFAULT_NUM_STEPS = 3


@dataclass(frozen=True)
class SpeculativeConfig:
    """The effective speculative settings of an engine (built by :meth:`from_args`).

    Example::

        >>> from sgl_ray.configs.engine_args import EngineArgs
        >>> cfg = SpeculativeConfig.from_args(EngineArgs(speculative_algorithm="NGRAM"))
        >>> cfg.algorithm, cfg.max_drafts
        ('NGRAM', 7)
    """

    algorithm: str
    num_draft_tokens: int  # tokens per verify step and request: the last accepted one + the drafts
    draft_model_path: str | None = None
    ngram_min_window: int = 1
    ngram_max_window: int = 12
    topk: int = 1  # children per expanded node of a draft tree; 1: chain drafts
    num_steps: int = 0  # draft passes (the tree's depth) of a draft model or EAGLE head
    # NGRAM trees from the n-gram cache (speculative.ngram_cache); max breadth 1: chains from the request's tokens
    ngram_min_breadth: int = 1
    ngram_max_breadth: int = 1
    ngram_match_type: str = "BFS"
    ngram_branch_length: int = 18
    ngram_capacity: int = 1_000_000

    @property
    def is_tree(self) -> bool:
        """Tree drafts (``speculative.tree``) rather than chains."""
        return self.topk > 1 or self.ngram_tree

    @property
    def ngram_tree(self) -> bool:
        """NGRAM drafts trees from the engine's n-gram cache (``speculative.ngram_cache``)."""
        return self.algorithm == "NGRAM" and self.ngram_max_breadth > 1

    @property
    def max_drafts(self) -> int:
        """Draft tokens a request proposes per verify step (at most)."""
        return self.num_draft_tokens - 1

    @property
    def uses_draft_model(self) -> bool:
        """A model drafts (STANDALONE, EAGLE, EAGLE3): the runner writes the drafts, the scheduler only counts
        them."""
        return self.algorithm != "NGRAM"

    @property
    def is_eagle(self) -> bool:
        return self.algorithm in ("EAGLE", "EAGLE3")

    @property
    def uses_mtp(self) -> bool:
        """EAGLE without a head checkpoint: the target's multi-token-prediction layer drafts (``speculative.mtp``)."""
        return self.algorithm == "EAGLE" and self.draft_model_path is None

    @classmethod
    def from_args(cls, args: Any) -> SpeculativeConfig | None:
        """The settings of ``args`` (an ``EngineArgs``), or None when speculation is off. Raises
        :class:`InvalidRequestError` for bad values and :class:`UnsupportedFeatureError` (naming the option) for
        combinations that do not exist yet."""
        algo = args.speculative_algorithm
        if algo is None:
            return None
        algo = _ALIASES.get(algo.upper(), algo.upper())
        if algo not in ALGORITHMS:
            raise InvalidRequestError(
                f"speculative_algorithm must be one of {ALGORITHMS}, got {args.speculative_algorithm!r}",
                param="speculative_algorithm",
            )
        topk = 1 if args.speculative_eagle_topk is None else args.speculative_eagle_topk
        if topk < 1:
            raise InvalidRequestError(
                f"speculative_eagle_topk must be >= 1, got {topk}", param="speculative_eagle_topk"
            )
        if topk > 1 and algo == "NGRAM":
            raise UnsupportedFeatureError(
                f"speculative_eagle_topk={topk}: NGRAM shapes its trees with speculative_ngram_min/max_bfs_breadth "
                "(speculative_eagle_topk belongs to STANDALONE, EAGLE and EAGLE3)",
                param="speculative_eagle_topk",
            )
        if topk > 1 and args.attention_backend == "flashinfer":
            raise UnsupportedFeatureError(
                "speculative_eagle_topk > 1 verifies draft trees with a tree attention mask, which the "
                "flashinfer attention backend does not have; use attention_backend='triton' (or 'torch')",
                param="speculative_eagle_topk",
            )
        if args.pp_size > 1:  # drafts, verification and the EAGLE head's hidden states live on one stage
            raise UnsupportedFeatureError(
                f"speculative decoding does not run with pipeline parallelism (pp_size={args.pp_size}); use "
                "tp_size instead, or leave speculative_algorithm unset",
                param="pp_size",
            )
        for name in ("speculative_num_steps", "speculative_num_draft_tokens"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {value}", param=name)
        lo, hi = args.speculative_ngram_min_match_window_size, args.speculative_ngram_max_match_window_size
        if lo < 1 or hi < lo:
            raise InvalidRequestError(
                f"speculative_ngram_min/max_match_window_size: need 1 <= min <= max, got {lo} and {hi}",
                param="speculative_ngram_min_match_window_size",
            )
        breadth = _ngram_tree_options(args) if algo == "NGRAM" else (1, 1)
        draft_path = args.speculative_draft_model_path
        if algo == "NGRAM":
            if draft_path is not None:
                raise InvalidRequestError(
                    "speculative_draft_model_path: NGRAM drafts from the request's own tokens and takes no model",
                    param="speculative_draft_model_path",
                )
            tokens = args.speculative_num_draft_tokens or _DEFAULT_NGRAM_DRAFT_TOKENS
        else:
            if algo == "EAGLE" and draft_path in (None, args.model_path):
                draft_path = None  # the target's own multi-token-prediction layer drafts (speculative.mtp)
            elif draft_path is None:
                what = (
                    "an EAGLE head checkpoint"
                    if algo != "STANDALONE"
                    else "a small model with the target's vocabulary"
                )
                raise InvalidRequestError(
                    f"speculative_algorithm={algo!r} needs speculative_draft_model_path ({what})",
                    param="speculative_draft_model_path",
                )
            steps = args.speculative_num_steps
            if steps is None:
                given = args.speculative_num_draft_tokens
                chain = topk == 1 and given is not None and given > 1
                steps = given - 1 if chain else _DEFAULT_NUM_STEPS
            tokens = steps + 1
            given = args.speculative_num_draft_tokens
            if topk > 1:
                most = topk + (steps - 1) * topk * topk  # every node the drafter scores
                tokens = min(steps * topk, most) + 1 if given is None else given
                if not 2 <= tokens <= most + 1:
                    raise InvalidRequestError(
                        f"speculative_num_draft_tokens={tokens}: a tree of speculative_num_steps={steps} and "
                        f"speculative_eagle_topk={topk} has 1 to {most} draft nodes, so 2 to {most + 1} tokens",
                        param="speculative_num_draft_tokens",
                    )
            elif given is not None and given != tokens:
                logger.warning(
                    "speculative_num_draft_tokens is set to speculative_num_steps + 1 = %d (chain drafts)",
                    tokens,
                )
        if tokens < 2:
            raise InvalidRequestError(
                "speculative_num_draft_tokens must be >= 2 (the last accepted token and at least one draft)",
                param="speculative_num_draft_tokens",
            )
        return cls(
            algorithm=algo,
            num_draft_tokens=tokens,
            draft_model_path=draft_path,
            ngram_min_window=lo,
            ngram_max_window=hi,
            topk=topk,
            num_steps=0 if algo == "NGRAM" else steps,
            ngram_min_breadth=breadth[0],
            ngram_max_breadth=breadth[1],
            ngram_match_type=args.speculative_ngram_match_type.upper(),
            ngram_branch_length=args.speculative_ngram_branch_length,
            ngram_capacity=args.speculative_ngram_capacity,
        )


def _ngram_tree_options(args: Any) -> tuple[int, int]:
    """NGRAM's (min, max) BFS breadth, its other tree options checked. The default max breadth is SGLang's 10
    (trees), or 1 (chains) with the flashinfer attention backend, which has no tree attention mask."""
    lo, hi = args.speculative_ngram_min_bfs_breadth, args.speculative_ngram_max_bfs_breadth
    if hi is None:
        hi = max(lo, 1 if args.attention_backend == "flashinfer" else 10)
    if lo < 1 or hi < lo:
        raise InvalidRequestError(
            f"speculative_ngram_min/max_bfs_breadth: need 1 <= min <= max, got {lo} and {hi}",
            param="speculative_ngram_min_bfs_breadth",
        )
    if hi > 1 and args.attention_backend == "flashinfer":
        raise UnsupportedFeatureError(
            f"speculative_ngram_max_bfs_breadth={hi}: NGRAM trees need a tree attention mask, which the flashinfer "
            "attention backend does not have; set speculative_ngram_max_bfs_breadth=1 (chains) or use "
            "attention_backend='triton'",
            param="speculative_ngram_max_bfs_breadth",
        )
    match_type = args.speculative_ngram_match_type
    if not isinstance(match_type, str) or match_type.upper() not in ("BFS", "PROB"):
        raise InvalidRequestError(
            f"speculative_ngram_match_type must be 'BFS' or 'PROB', got {match_type!r}",
            param="speculative_ngram_match_type",
        )
    window = args.speculative_ngram_max_match_window_size
    if args.speculative_ngram_branch_length <= window:
        raise InvalidRequestError(
            f"speculative_ngram_branch_length={args.speculative_ngram_branch_length} must exceed "
            f"speculative_ngram_max_match_window_size={window} (a match needs tokens after it)",
            param="speculative_ngram_branch_length",
        )
    if args.speculative_ngram_capacity < args.speculative_ngram_branch_length:
        raise InvalidRequestError(
            f"speculative_ngram_capacity={args.speculative_ngram_capacity} must hold one n-gram of "
            f"speculative_ngram_branch_length={args.speculative_ngram_branch_length} nodes",
            param="speculative_ngram_capacity",
        )
    return lo, hi
