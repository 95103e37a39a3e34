"""The default grammar backend, over xgrammar's compiler and matcher."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch
import xgrammar as xgr

from sgl_ray.constrained.base import GrammarBackend, GrammarMatcher, GrammarSpec, compiler_message
from sgl_ray.errors import InvalidRequestError


class XGrammarMatcher(GrammarMatcher):
    __slots__ = ("_m",)

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._m = matcher

    def accept_token(self, token: int) -> bool:
        return self._m.accept_token(token)

    def fill_next_token_bitmask(self, out: np.ndarray) -> None:
        self._m.fill_next_token_bitmask(torch.from_numpy(out.reshape(1, -1)), 0)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def find_jump_forward_string(self) -> str:
        return self._m.find_jump_forward_string()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._m.rollback(num_tokens)


class XGrammarBackend(GrammarBackend):
    """JSON schemas compile to compact JSON (no free whitespace), so a schema's keys and punctuation are forced
    spans that jump-forward decoding can skip."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        super().__init__(tokenizer, vocab_size, stop_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._fills = _BatchFills(_fill_threads())

    def compile(self, spec: GrammarSpec) -> Any:
        try:
            if spec.kind == "json_schema":
                _check_json(spec.value)
                return self._compiler.compile_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.value)
            if spec.kind == "ebnf":
                return self._compiler.compile_grammar(spec.value)
            if spec.kind == "structural_tag":
                _check_json(spec.value)
                return self._compiler.compile_structural_tag(spec.value)
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequestError(f"{spec.kind}: {compiler_message(e)}", param=spec.kind) from None
        raise InvalidRequestError(f"unknown grammar kind {spec.kind!r}", param="grammar")

    def matcher(self, compiled: Any) -> GrammarMatcher:
        return XGrammarMatcher(xgr.GrammarMatcher(compiled))

    def fill_bitmasks(self, matchers: list[GrammarMatcher], out: np.ndarray, rows: list[int]) -> None:
        if len(matchers) < _BATCH_FILL_MIN:
            super().fill_bitmasks(matchers, out, rows)
            return
        self._fills.fill([m._m for m in matchers], torch.from_numpy(out), rows)  # type: ignore[attr-defined]


_BATCH_FILL_MIN = 8  # fewer constrained rows are filled one by one on the scheduler thread


class _BatchFills:
    """Batched mask fills on xgrammar's threads (outside the GIL), with as many threads as pay off.

    Threads have a cost per call: on an H200 host (16 cores), filling 128 masks in easy grammar states took
    0.19 ms on one thread, 0.46 ms on 2 and 1.34 ms on 15. Inside a ``maxLength`` string one mask can take
    milliseconds, and then threads win. So the cost of a row is tracked (a moving average) and each batch gets the
    thread count that minimises ``rows × row_cost / n + overhead(n)``.
    """

    SPAWN_S = 2.5e-4  # fixed cost of a multi-threaded fill, and the cost per thread (measured as above)
    PER_THREAD_S = 8e-5

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self.row_s = 0.0  # moving average of one row's fill time on one thread
        self._batches: dict[int, xgr.BatchGrammarMatcher] = {}
        self.last_threads = 1

    def overhead(self, n: int) -> float:
        return 0.0 if n == 1 else self.SPAWN_S + self.PER_THREAD_S * n

    def threads_for(self, rows: int) -> int:
        work = rows * self.row_s
        return min(range(1, self.max_threads + 1), key=lambda n: work / n + self.overhead(n))

    def fill(self, matchers: list, out: torch.Tensor, rows: list[int]) -> None:
        n = self.threads_for(len(rows))
        batch = self._batches.get(n)
        if batch is None:
            batch = self._batches[n] = xgr.BatchGrammarMatcher(max_threads=n)
        t0 = time.perf_counter()
        batch.batch_fill_next_token_bitmask(matchers, out, rows)
        row_s = max(0.0, time.perf_counter() - t0 - self.overhead(n)) * n / len(rows)
        self.row_s = row_s if self.row_s == 0.0 else 0.8 * self.row_s + 0.2 * row_s
        self.last_threads = n


def _fill_threads() -> int:
    """At most: the cores this process may use, less one for the scheduler thread."""
    return max(1, min(16, len(os.sched_getaffinity(0)) - 1))


def _check_json(text: str) -> None:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError("a JSON schema must be an object or a boolean")
