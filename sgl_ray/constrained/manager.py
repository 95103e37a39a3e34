"""Compiling grammars off the scheduler thread, with a cache of compiled grammars keyed by spec."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from sgl_ray.constrained.base import GrammarBackend, GrammarMatcher, GrammarSpec, create_grammar_backend
from sgl_ray.errors import InvalidRequestError


class GrammarManager:
    """Starts compiles on a worker thread and remembers their results.

    The backend itself is built lazily on the worker (reading a tokenizer's vocabulary takes a moment), so the
    first structured request does not stall the running batch either. Failed compiles are cached too: a bad schema
    sent again is rejected at once.

    Example::

        >>> mgr = GrammarManager("xgrammar", tokenizer, vocab_size=49152, stop_token_ids=(2,))  # doctest: +SKIP
        >>> fut = mgr.compile(GrammarSpec("regex", r"\\d+"))  # doctest: +SKIP
        >>> matcher = mgr.matcher(fut.result())  # doctest: +SKIP
    """

    def __init__(
        self,
        backend: str,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: tuple[int, ...],
        max_cached: int = 256,
        num_threads: int = 2,  # a slow compile does not hold up the others (xgrammar releases the GIL)
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="sgl-ray-grammar")
        self._backend_future: Future[GrammarBackend] = self._pool.submit(
            create_grammar_backend, backend, tokenizer, vocab_size, stop_token_ids
        )
        self._cache: OrderedDict[GrammarSpec, Future[Any]] = OrderedDict()
        self.max_cached = max_cached
        self.vocab_size = vocab_size

    def compile(self, spec: GrammarSpec) -> Future[Any]:
        """The (possibly finished) compile of ``spec``; its exception is an :class:`InvalidRequestError`."""
        fut = self._cache.get(spec)
        if fut is not None:
            self._cache.move_to_end(spec)
            return fut
        fut = self._pool.submit(self._compile, spec)
        self._cache[spec] = fut
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return fut

    def _compile(self, spec: GrammarSpec) -> Any:
        try:
            return self._backend_future.result().compile(spec)
        except InvalidRequestError:
            raise
        except Exception as e:  # the backend failed in a way it did not classify: still this request's fault
            raise InvalidRequestError(f"{spec.kind}: {e}", param=spec.kind) from None

    def matcher(self, compiled: Any) -> GrammarMatcher:
        return self._backend_future.result().matcher(compiled)

    def fill_bitmasks(self, matchers: list[GrammarMatcher], out: np.ndarray, rows: list[int]) -> None:
        """See :meth:`GrammarBackend.fill_bitmasks` (the backend exists: every matcher came from it)."""
        self._backend_future.result().fill_bitmasks(matchers, out, rows)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
