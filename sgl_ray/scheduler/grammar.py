"""Structured outputs on the scheduler side: grammar matchers of requests, their token masks, jump-forward.

Jump-forward with verification (greedy requests). When a request's grammar admits exactly one continuation
string ``s`` after its newest token ``x``, the tokens ``t_1..t_m`` of ``s`` are appended at once and the next
step extends ``[x, t_1..t_m]`` in one forward pass, sampling every one of those ``m + 1`` rows under the mask the
grammar had at that point::

    rows:     x     t_1    ...   t_m
    sampled:  g_0   g_1    ...   g_m        (g_i under the mask after x, t_1..t_i)
    accept t_{i+1} while g_i == t_{i+1}; the first g_k that differs (or g_m) is the next token

Each ``g_i`` is exactly the token step-by-step greedy decoding would pick after the same prefix, so the output is
identical to decoding token by token, whatever tokenization of ``s`` the model prefers at the boundaries: a
rejected forced token is rolled back from the output, the matcher and the KV pool, and replaced by the model's
own choice. Sampled (non-greedy) requests take all of ``t_1..t_m`` and sample only the last row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sgl_ray.constrained.base import GrammarSpec, bitmask_width
from sgl_ray.constrained.manager import GrammarManager
from sgl_ray.errors import InvalidRequestError
from sgl_ray.scheduler.kv_manager import KVCacheManager
from sgl_ray.scheduler.request import FinishReason, Req, ReqStatus

_UNDO = -1


class GrammarTracker:
    """Example::

    >>> tracker = GrammarTracker(tokenizer, vocab_size=49152)  # doctest: +SKIP
    >>> tracker.start(req)  # on add_request: the compile runs on a worker thread  # doctest: +SKIP
    >>> tracker.ready(req)  # on admission: False while compiling  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        backend: str = "xgrammar",
        jump_forward: bool = True,
        max_jump_tokens: int = 64,
        compile_timeout_s: float = 300.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.width = bitmask_width(vocab_size)
        self.backend = backend
        self.jump_forward = jump_forward
        self.max_jump_tokens = max_jump_tokens
        self.compile_timeout_s = compile_timeout_s
        self._manager: GrammarManager | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, req: Req) -> None:
        """Begin compiling the request's grammar (no-op for unconstrained requests)."""
        spec = req.sampling.grammar
        if spec is None:
            return
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"{spec[0]}: structured outputs need a tokenizer (skip_tokenizer_init is set)", param=spec[0]
            )
        if self._manager is None:
            self._manager = GrammarManager(self.backend, self.tokenizer, self.vocab_size, req.eos_token_ids)
        req.grammar_compile = self._manager.compile(GrammarSpec(*spec))
        req.grammar_wait_since = time.monotonic()

    def ready(self, req: Req) -> bool:
        """Whether the request may be admitted; raises the compile's :class:`InvalidRequestError`, or one of its
        own once the request has waited ``compile_timeout_s`` for it."""
        fut = req.grammar_compile
        if fut is None or req.grammar is not None:
            return True
        if not fut.done():
            waited = time.monotonic() - req.grammar_wait_since
            if waited > self.compile_timeout_s:
                kind = req.sampling.grammar[0]
                raise InvalidRequestError(
                    f"{kind}: the grammar did not compile within {self.compile_timeout_s:g} s "
                    "(grammar_compile_timeout); simplify it, or send it again once its compile has finished",
                    param=kind,
                )
            return False
        assert self._manager is not None
        req.grammar = self._manager.matcher(fut.result())  # re-raises a failed compile
        for t in req.output_ids:  # a request resumed elsewhere with tokens already generated
            req.grammar.accept_token(t)
        return True

    def shutdown(self) -> None:
        if self._manager is not None:
            self._manager.shutdown()

    # --- masks -------------------------------------------------------------------------------------------------
    def masks(self, entries: list) -> np.ndarray | None:
        """[S, W] int32 masks for the sampled rows of a batch, or None when no sampled row is constrained."""
        if not any(e.sample and e.req.grammar is not None for e in entries):
            return None
        total = sum(e.num_sample for e in entries if e.sample)
        out = np.full((total, self.width), -1, dtype=np.int32)
        row = 0
        fill, fill_rows = [], []
        for e in entries:
            if not e.sample:
                continue
            r = e.req
            if (
                r.grammar is not None and r.status is ReqStatus.RUNNING
            ):  # (a finished row is dropped: any mask)
                if e.row_masks is not None:  # a speculative verify step: masks after each draft
                    out[row : row + e.num_sample] = e.row_masks
                elif r.jump_masks is not None:
                    out[row : row + e.num_sample] = r.jump_masks[-e.num_sample :]
                else:
                    fill.append(r.grammar)
                    fill_rows.append(row)
            row += e.num_sample
        if fill:
            assert self._manager is not None
            self._manager.fill_bitmasks(fill, out, fill_rows)
        return out

    def draft_masks(self, req: Req, drafts: list[int]) -> tuple[list[int], np.ndarray]:
        """Speculative drafts under ``req``'s grammar: the longest prefix of ``drafts`` the grammar accepts in
        order (cut after a draft that completes it), and the masks of the verify rows ``[len + 1, W]`` (row ``i``:
        after the first ``i`` drafts). The matcher is left as it was."""
        m = req.grammar
        assert m is not None and self._manager is not None
        masks = np.full((len(drafts) + 1, self.width), -1, dtype=np.int32)
        self._manager.fill_bitmasks([m], masks, [0])
        taken = 0
        for t in drafts:
            if not m.accept_token(t):
                break
            taken += 1
            if m.is_terminated():  # the request ends at this draft: its row's token is never used
                break
            self._manager.fill_bitmasks([m], masks, [taken])
        if taken:
            m.rollback(taken)
        return drafts[:taken], masks[: taken + 1]

    def verify_masks(self, req: Req, tokens: np.ndarray, parents: np.ndarray | None = None) -> np.ndarray:
        """The masks of a verify chunk's rows ``[x, n_1..n_N]`` once a runner-side drafter proposed the nodes
        ``tokens`` ([N]; a chain when ``parents`` is None, else each node's parent row, 0 the root ``x``): row ``i``
        allows what the grammar allows after the tokens on the way to it. A row the grammar cannot reach (a node
        after one it rejects, or after the grammar completed) allows every token: its parent's mask rules its token
        out, so it is never emitted. The matcher is left as it was."""
        m = req.grammar
        assert m is not None and self._manager is not None
        n = len(tokens)
        masks = np.full((n + 1, self.width), -1, dtype=np.int32)
        if parents is None:
            parents = np.arange(n)  # node i (row i + 1) follows row i
        children: list[list[int]] = [[] for _ in range(n + 1)]
        for i, parent in enumerate(parents[:n].tolist()):
            children[parent].append(i + 1)
        fill = self._manager.fill_bitmasks
        fill([m], masks, [0])
        stack = children[0][
            ::-1
        ]  # rows to visit, depth first; _UNDO: leave the subtree of the last accepted node
        while stack:
            row = stack.pop()
            if row == _UNDO:
                m.rollback(1)
                continue
            if not m.accept_token(int(tokens[row - 1])):
                continue
            stack.append(_UNDO)
            if m.is_terminated():  # the request ends at this node: its row's token is never used
                continue
            fill([m], masks, [row])
            stack.extend(children[row][::-1])
        return masks

    def may_jump(self, req: Req) -> bool:
        """Whether jump-forward may append tokens to ``req`` after a sampled token."""
        return self.jump_forward and req.grammar is not None and _may_jump(req)

    def forces_string(self, req: Req) -> bool:
        """Whether ``req`` may jump and its grammar now admits only one continuation."""
        assert req.grammar is not None
        return self.may_jump(req) and bool(req.grammar.find_jump_forward_string())

    # --- tokens ------------------------------------------------------------------------------------------------
    def accept(self, req: Req, token: int) -> FinishReason | None:
        """Advance the matcher by a sampled token; a completed grammar ends the request."""
        m = req.grammar
        if m is None:
            return None
        if not m.accept_token(token):
            return FinishReason("abort", message=f"token {token} does not match the grammar")
        if m.is_terminated():
            return FinishReason("stop", matched=token)
        return None

    def settle(self, req: Req, row_tokens: list[int], kv: KVCacheManager) -> list[int]:
        """After the step that computed the pending forced tokens: keep those verified (see :meth:`verify`),
        free the KV of the rest, and return the kept ones."""
        forced = len(req.jump_tokens)
        keep = self.verify(req, row_tokens)
        if keep < forced:
            kv.truncate(req, req.num_computed - (forced - keep))
        return req.output_ids[len(req.output_ids) - keep :] if keep else []

    def verify(self, req: Req, row_tokens: list[int]) -> int:
        """Settle the pending forced tokens given the tokens sampled on their rows (see the module note).
        Rolls back the rejected ones (output and matcher) and returns how many forced tokens were kept."""
        forced = req.jump_tokens
        keep = len(forced)
        if len(row_tokens) > 1:  # verified (greedy): keep the prefix the model agrees with
            keep = next((i for i, t in enumerate(forced) if row_tokens[i] != t), len(forced))
        reject = len(forced) - keep
        if reject:
            assert req.grammar is not None
            req.grammar.rollback(reject)
            del req.output_ids[-reject:]
        req.jump_tokens, req.jump_masks = [], None
        req.jump_forward_tokens += keep
        return keep

    def unjump(self, req: Req) -> None:
        """Drop unverified forced tokens (the request is preempted before they were computed)."""
        if req.jump_tokens:
            assert req.grammar is not None
            req.grammar.rollback(len(req.jump_tokens))
            del req.output_ids[-len(req.jump_tokens) :]
        req.jump_tokens, req.jump_masks = [], None

    def jump(self, req: Req, limit: int) -> None:
        """After a sampled token: append the tokens of the string the grammar forces next (at most ``limit``, and
        leaving room for one more sampled token within ``max_new_tokens``)."""
        self.jump_many([(req, limit)])

    def jump_many(self, items: list[tuple[Req, int]]) -> None:
        """:meth:`jump` for several requests at once. A verified (greedy) jump needs the mask after every forced
        token; these fills run in waves over the requests, one batched fill per forced-token position, so
        they spread over the backend's threads instead of running one by one on this thread."""
        jumps: list[_Jump] = []
        for req, limit in items:
            limit = min(limit, self.max_jump_tokens, req.remaining_new_tokens - 1)
            m = req.grammar
            if m is None or not self.jump_forward or limit <= 0 or not _may_jump(req):
                continue
            forced = m.find_jump_forward_string()
            if forced:
                tokens = self.tokenizer.encode(forced, add_special_tokens=False)[:limit]
                jumps.append(_Jump(req, tokens, np.empty((len(tokens) + 1, self.width), dtype=np.int32)))
        if not jumps:
            return
        self._fill([j for j in jumps if j.verify], 0)  # the mask before the first forced token
        for i in range(max(len(j.tokens) for j in jumps)):
            wave = []  # the jumps whose mask after their token i is needed
            for j in jumps:
                if not j.open or i >= len(j.tokens):
                    continue
                assert j.req.grammar is not None
                # (a rejected token leaves the matcher as it was)
                j.open = j.req.grammar.accept_token(j.tokens[i])
                if j.open:
                    j.taken.append(j.tokens[i])
                # sampled requests need only the mask after their last taken token
                last = not j.open or i + 1 == len(j.tokens)
                if (j.open and j.verify) or (last and j.taken and not j.verify):
                    wave.append(j)
            self._fill(wave, None)
        for j in jumps:
            if j.taken:
                req = j.req
                req.jump_tokens = j.taken
                req.jump_masks = j.masks[: len(j.taken) + 1]
                req.output_ids.extend(j.taken)

    def _fill(self, jumps: list[_Jump], row: int | None) -> None:
        """One batched fill: each jump's mask at ``row`` (None: after its tokens taken so far)."""
        if not jumps:
            return
        assert self._manager is not None
        out = np.empty((len(jumps), self.width), dtype=np.int32)
        self._manager.fill_bitmasks([j.req.grammar for j in jumps], out, list(range(len(jumps))))
        for k, j in enumerate(jumps):
            j.masks[len(j.taken) if row is None else row] = out[k]


@dataclass(eq=False)
class _Jump:
    """A jump being prepared: the forced ``tokens``, those the matcher took so far, their masks."""

    req: Req
    tokens: list[int]
    masks: np.ndarray  # [len(tokens) + 1, W]
    taken: list[int] = field(default_factory=list)
    open: bool = True  # still taking tokens

    @property
    def verify(self) -> bool:
        return self.req.sampling.is_greedy


def _may_jump(req: Req) -> bool:
    """Forced tokens are not sampled, so requests whose sampling depends on each token's logits or counts do not
    jump: logprobs, penalties, min_new_tokens."""
    p = req.sampling
    return not (req.return_logprob or p.needs_penalties or p.min_new_tokens > 0)
