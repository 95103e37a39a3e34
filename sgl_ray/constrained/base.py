"""The grammar-backend seam: what the scheduler needs to constrain a request's tokens to a grammar.

A :class:`GrammarBackend` compiles a :class:`GrammarSpec` (JSON schema, regex, EBNF, any JSON object, or an
xgrammar structural tag) into an opaque compiled grammar, once per distinct spec; :meth:`GrammarBackend.matcher`
then starts a per-request :class:`GrammarMatcher` over it. Bitmasks are packed int32 rows of
``ceil(vocab_size / 32)`` words: bit ``t % 32`` of word ``t // 32`` set means token ``t`` is allowed (the layout of
:mod:`sgl_ray.sampling.bitmask`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal, NamedTuple

import numpy as np

GrammarKind = Literal["json_schema", "regex", "ebnf", "json_object", "structural_tag"]
GRAMMAR_KINDS: tuple[str, ...] = ("json_schema", "regex", "ebnf", "json_object", "structural_tag")


class GrammarSpec(NamedTuple):
    """What a request is constrained to; also the compile-cache key."""

    kind: str  # one of GRAMMAR_KINDS
    value: str  # the schema / regex / grammar / structural-tag JSON text ("" for json_object)


def compiler_message(e: Exception) -> str:
    """The first line of a grammar compiler's error without its ``[time] file.cc:line:`` prefix or an internal
    ``Check failed: (...) is false:`` assertion text, for a user-facing 400.

    >>> compiler_message(RuntimeError("[12:00:01] /src/json.cc:51: Check failed: (x) is false: bad schema\\nmore"))
    'bad schema'
    """
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
        if ": " in text and ".cc:" in text.split(": ", 1)[0]:
            text = text.split(": ", 1)[1]
    if text.startswith("Check failed:") and " is false: " in text:
        text = text.split(" is false: ", 1)[1]
    return text or type(e).__name__


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


class GrammarMatcher(ABC):
    """The state of one request inside its grammar.

    Contract: the matcher starts before the first output token. ``accept_token`` advances by one token and returns
    False (leaving the state unchanged) for a token the grammar forbids; ``rollback(n)`` undoes the last ``n``
    accepted tokens. ``is_terminated`` is true once the grammar has completed and a stop token was accepted.
    ``find_jump_forward_string`` is the longest string every continuation must start with ("" if none).
    """

    @abstractmethod
    def accept_token(self, token: int) -> bool: ...

    @abstractmethod
    def fill_next_token_bitmask(self, out: np.ndarray) -> None:
        """Write the allowed next tokens into ``out`` [bitmask_width(vocab)] int32."""

    @abstractmethod
    def is_terminated(self) -> bool: ...

    @abstractmethod
    def find_jump_forward_string(self) -> str: ...

    @abstractmethod
    def rollback(self, num_tokens: int) -> None: ...


class GrammarBackend(ABC):
    """Compiles grammars for one tokenizer/vocabulary.

    Contract: ``compile`` is thread-safe (the grammar manager calls it from worker threads) and raises
    :class:`~sgl_ray.errors.InvalidRequestError` naming the problem for an invalid spec; ``matcher`` is cheap and
    called on the scheduler thread.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> Any: ...

    @abstractmethod
    def matcher(self, compiled: Any) -> GrammarMatcher: ...

    def fill_bitmasks(self, matchers: list[GrammarMatcher], out: np.ndarray, rows: list[int]) -> None:
        """``matchers[i]``'s allowed next tokens into ``out[rows[i]]`` (``out``: [R, width] int32), for a whole
        batch at once; backends may spread it over threads."""
        for m, row in zip(matchers, rows, strict=True):
            m.fill_next_token_bitmask(out[row])


_BACKENDS: dict[str, tuple[str, str]] = {
    "xgrammar": ("sgl_ray.constrained.xgrammar_backend", "XGrammarBackend")
}


def create_grammar_backend(
    name: str, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]
) -> GrammarBackend:
    """The backend registered as ``name`` (imported lazily)."""
    import importlib

    from sgl_ray.errors import InvalidRequestError

    if name not in _BACKENDS:
        raise InvalidRequestError(f"grammar_backend: unknown backend {name!r}; known: {sorted(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(tokenizer, vocab_size, stop_token_ids)
