"""Speculative decoding on the scheduler side: which decoding requests speculate, their drafts, and what a verify
step's result does to a request.

A speculating request's decode step extends ``[x, d_1..d_k]`` (``x`` its newest token, ``d_i`` drafts) with
``1 + k`` KV slots; the runner verifies the drafts and reports how many tokens the rows emit (``m + 1``: ``m`` kept
drafts and one more). Settling then appends those tokens one at a time, exactly as ``m + 1`` decode steps would
(stop tokens, stop strings, ``max_new_tokens``, the grammar: the first that ends the request drops the rest), and
rolls the KV back to the tokens kept — the slots of rejected drafts return to the pool, and the request's token
list, the prefix cache and preemption only ever see accepted tokens. This is the jump-forward verification of
``scheduler.grammar`` with drafts in place of forced tokens, and the same ``KVCacheManager.truncate``.

Which requests speculate: every decoding request but, with tree drafts, those asking for top logprobs (those decode
one token per step in the same batches). Penalties and ``min_new_tokens`` speculate too: the runner samples each
verify row counting the drafts before it as emitted tokens (``speculative.verify``).

Under a grammar, a verify row samples under the grammar's mask after the drafts before it. NGRAM drafts are known
here, so they are cut at the first token the grammar rejects and the masks go out with the plan. A runner-side
drafter (STANDALONE, EAGLE, MTP) proposes its drafts during the step: the plan goes out with ``drafts_deferred``,
the runner answers with the drafts once the target's forward pass ran, and the masks built from them
(``GrammarTracker.verify_masks``: every row of a chain or tree, by walking it with the matcher) come back before
it samples — one more exchange with the runner in such steps.

With tree drafts (``speculative.tree``) the chunk is ``[x, n_1..n_N]``, the tree's nodes parents first; the runner
copies the accepted path's KV to the slots of the chunk's first rows, so settling is the same as for a chain.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from sgl_ray.scheduler.plan import DRAFT_TOKEN, StepOutput
from sgl_ray.scheduler.request import FinishReason, Req
from sgl_ray.speculative.config import SpeculativeConfig
from sgl_ray.speculative.ngram import ngram_drafts
from sgl_ray.speculative.ngram_cache import NgramCache

if TYPE_CHECKING:
    from sgl_ray.scheduler.batch import BatchEntry
    from sgl_ray.scheduler.grammar import GrammarTracker
    from sgl_ray.scheduler.kv_manager import KVCacheManager
    from sgl_ray.scheduler.output import OutputProcessor

Logprob = tuple[float | None, int]


class Proposal(NamedTuple):
    """A speculating request's drafts for its next step (``DRAFT_TOKEN`` placeholders when the runner's drafter
    writes them), under a grammar the masks of its verify rows, and for an NGRAM tree each node's parent row (0:
    the request's newest token; the nodes come parents first)."""

    drafts: list[int]
    row_masks: np.ndarray | None = None
    parents: list[int] | None = None


class Settled(NamedTuple):
    tokens: list[int]  # appended to the request's output
    text: str
    finish: FinishReason | None
    logprobs: list[Logprob] | None
    top_logprobs: list[list[Logprob]] | None


@dataclass
class SpecStats:
    """Engine-wide counters (``get_stats()``)."""

    verify_steps: int = 0  # decode steps of speculating requests
    emitted_tokens: int = 0  # tokens those steps' verification emitted (kept drafts + 1 each)
    proposed_drafts: int = 0
    accepted_drafts: int = 0
    overlapped_steps: int = 0  # verify steps planned while the request's previous step ran (overlap)

    def to_dict(self, config: SpeculativeConfig) -> dict[str, Any]:
        return {
            "spec_algorithm": config.algorithm,
            "spec_num_draft_tokens": config.num_draft_tokens,
            "spec_verify_steps": self.verify_steps,
            "spec_emitted_tokens": self.emitted_tokens,
            "spec_accept_length": self.emitted_tokens / self.verify_steps if self.verify_steps else 0.0,
            "spec_accept_rate": self.accepted_drafts / self.proposed_drafts if self.proposed_drafts else 0.0,
            "spec_proposed_drafts": self.proposed_drafts,
            "spec_accepted_drafts": self.accepted_drafts,
            "spec_overlapped_steps": self.overlapped_steps,
        }


class Speculation:
    """Example::

    >>> spec = Speculation(SpeculativeConfig("NGRAM", 4), context_length=2048, grammars=tracker)  # doctest: +SKIP
    >>> drafts, masks, parents = spec.propose(req)  # a decoding request: up to 3 drafts  # doctest: +SKIP
    """

    def __init__(self, config: SpeculativeConfig, context_length: int, grammars: GrammarTracker) -> None:
        self.config = config
        self.context_length = context_length
        self.grammars = grammars
        self.stats = SpecStats()
        self.ngram: NgramCache | None = None  # NGRAM trees: the engine's n-gram cache
        # each request's place in the cache: (cursors, tokens recorded, the cache's epoch, the last tokens recorded);
        # gone with the request
        self._ngram_state: weakref.WeakKeyDictionary[Req, tuple[list[int], int, int, np.ndarray]] = (
            weakref.WeakKeyDictionary()
        )
        if config.ngram_tree:
            self.ngram = NgramCache(
                config.ngram_capacity,
                config.ngram_branch_length,
                config.ngram_min_window,
                config.ngram_max_window,
                config.ngram_min_breadth,
                config.ngram_max_breadth,
                config.ngram_match_type,
            )

    def stats_dict(self) -> dict[str, Any]:
        """The engine-wide counters (``get_stats()``), with the n-gram cache's size for NGRAM trees."""
        out = self.stats.to_dict(self.config)
        if self.ngram is not None:
            out["spec_ngram_cache_nodes"] = self.ngram.num_nodes
        return out

    def eligible(self, r: Req) -> bool:
        """Whether a decoding request speculates. Penalties and ``min_new_tokens`` do: each verify row counts the
        drafts before it as emitted (``speculative.verify``)."""
        # the sampler's top logprobs are of a tree's rows, not of the accepted path's
        return not (self.config.is_tree and r.return_logprob and r.top_logprobs_num > 0)

    def propose(self, r: Req) -> Proposal | None:
        """Drafts for a decoding request's next step; None if it does not speculate. No draft goes further than
        ``max_new_tokens`` and the context leave room for after its next token."""
        if not self.eligible(r):
            return None
        # With a step in flight (overlap scheduling): the context must hold the chunk even if that step keeps every
        # draft; drafts past max_new_tokens are only wasted, so they are cut as if it keeps none.
        pending = r.inflight_samples + r.inflight_drafts
        room = min(
            r.remaining_new_tokens - r.inflight_samples - 1, self.context_length - r.num_tokens - pending - 1
        )
        limit = min(self.config.max_drafts, room)
        if limit <= 0:
            return Proposal([])
        if self.config.uses_draft_model:
            return Proposal([DRAFT_TOKEN] * limit)
        tokens = _tokens(r)
        cfg = self.config
        if self.ngram is not None:
            self._record(r, tokens)
            # a tree reaches no deeper than a chain may, and its chunk (one row per node) fits the context too
            width = min(cfg.max_drafts, self.context_length - r.num_tokens - 1)
            nodes, parents = self.ngram.draft_tree(tokens, width, room)
            masks = None
            if r.grammar is not None and nodes:
                masks = self.grammars.verify_masks(r, np.asarray(nodes), np.asarray(parents))
            return Proposal(nodes, masks, parents)
        chain = ngram_drafts(tokens, limit, cfg.ngram_min_window, cfg.ngram_max_window)
        if r.grammar is not None and chain:
            chain, masks = self.grammars.draft_masks(r, chain)
            return Proposal(chain, masks if chain else None)
        return Proposal(chain)

    def _record(self, r: Req, tokens: np.ndarray) -> None:
        """Bring the n-gram cache up to date with ``r``'s output (from the end of its prompt on)."""
        cache = self.ngram
        assert cache is not None
        state = self._ngram_state.get(r)
        tail = cache.branch_length - 1  # tokens before the first new one that the new n-grams start in
        cursors: list[int] = []
        if state is None:  # a new request: its output, after the end of its prompt
            start = max(len(r.prompt_ids) - tail, 0)
        elif (changed := _first_change(tokens, state[1], state[3])) < state[1]:
            # tokens taken back (a rejected jump-forward), maybe grown again: the cursors end in the old ones
            start = max(changed - tail, 0)
        elif state[2] != cache.epoch:  # an eviction may have dropped its cursors: walk them again
            start = max(state[1] - tail, 0)
        else:
            cursors, start = state[0], state[1]
        n = len(tokens)
        recent = tokens[max(n - tail, 0) :].copy()
        self._ngram_state[r] = (cache.extend(cursors, tokens[start:].tolist()), n, cache.epoch, recent)

    def settle(
        self,
        r: Req,
        entry: BatchEntry,
        result: StepOutput,
        kv: KVCacheManager,
        outputs: OutputProcessor,
    ) -> Settled:
        """Append what a verify step emitted (``r.num_computed`` already counts its whole chunk)."""
        base = r.num_computed - entry.extend_len  # KV before the step: the new token x sits at position base
        tokens: list[int] = []
        text = ""
        finish = None
        for t in entry.row_tokens:
            r.output_ids.append(t)
            tokens.append(t)
            finish = outputs.check_token_finish(r, t)
            grammar_finish = self.grammars.accept(r, t)
            if grammar_finish is not None and (finish is None or finish.type == "length"):
                finish = grammar_finish
            piece, finish = outputs.text_delta(r, [t], finish)
            text += piece
            if finish is not None:
                break
        if r.inflight_tokens:  # its next step runs already, over the rejected drafts' positions (overlap)
            kv.drop_tail(r, entry.extend_len - len(tokens), base + len(tokens))
        else:
            kv.truncate(r, base + len(tokens))  # keep the KV of x and the kept drafts; free the rest
        r.decode_steps += 1
        r.spec_verify_ct += 1
        r.spec_proposed_drafts += len(entry.drafts)
        r.spec_accepted_drafts += entry.num_emitted - 1
        st = self.stats
        st.verify_steps += 1
        st.emitted_tokens += entry.num_emitted
        st.proposed_drafts += len(entry.drafts)
        st.accepted_drafts += entry.num_emitted - 1
        st.overlapped_steps += entry.ahead
        logprobs = top = None
        if r.return_logprob and result.logprobs is not None:
            lo = entry.rows[0]
            rows = range(lo, lo + len(tokens))
            logprobs = [(float(result.logprobs[i]), t) for i, t in zip(rows, tokens, strict=True)]
            k = r.top_logprobs_num
            if k > 0 and result.top_ids is not None and result.top_vals is not None:
                top = [
                    [
                        (float(v), int(j))
                        for v, j in zip(result.top_vals[i][:k], result.top_ids[i][:k], strict=True)
                    ]
                    for i in rows
                ]
            elif k > 0:
                top = [[] for _ in rows]
        return Settled(tokens, text, finish, logprobs, top)


def _first_change(tokens: np.ndarray, n: int, recent: np.ndarray) -> int:
    """The first position where ``tokens`` differ from what was recorded when it had ``n`` tokens, the last of
    which were ``recent`` (positions before those are taken as unchanged); ``n`` if none."""
    lo = n - len(recent)
    m = min(n, len(tokens))
    if m < lo:
        return m
    diff = np.flatnonzero(tokens[lo:m] != recent[: m - lo])
    return lo + int(diff[0]) if len(diff) else m


def _tokens(r: Req) -> np.ndarray:
    """The request's prompt + output as int64 (the prompt's array is made once per request)."""
    prompt = r.__dict__.get("_prompt_array")
    if prompt is None:
        prompt = r.__dict__["_prompt_array"] = np.asarray(r.prompt_ids, dtype=np.int64)
    return np.concatenate([prompt, np.asarray(r.output_ids, dtype=np.int64)])
