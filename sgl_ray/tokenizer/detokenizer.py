"""Streaming detokenization: token ids in, text deltas out, never a partial character."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    Invariant: for any split of ``output_ids`` into ``step`` calls,
    ``"".join(deltas) + flush() == tokenizer.decode(output_ids, skip_special_tokens=...)``, and ``flush()``
    returns ``""`` unless the text ends in an incomplete UTF-8 character. Deltas are never retracted, and
    ``text`` never ends in an incomplete character (it is held back until its last byte arrives).

    Algorithm (the offset technique of vLLM/SGLang): decoding a token on its own is wrong (sentencepiece drops
    the leading space of the first token, byte tokens may be half a character), so each step decodes a short
    window that starts at an earlier emission point and emits only what the new tokens add to it::

        output_ids: [ already emitted ... | prefix window | not yet emitted ]
                                          ^prefix_offset  ^read_offset     ^len(output_ids)
        delta = decode(ids[prefix_offset:])[len(decode(ids[prefix_offset:read_offset])):]

    Both offsets only ever sit at emission points, where the decoded text ended on a complete character, so
    byte-level and byte-fallback tokens never straddle the window start. The offsets move only when a step
    emits text, so the prefix window always holds a token that survives ``skip_special_tokens``; that keeps
    first-token effects (sentencepiece's stripped leading space) inside the prefix, where they cancel out.
    At ``prefix_offset == 0`` the window is the whole output, so the first token is decoded exactly as the
    full decode would. Cost per step is O(window): the previous emitting step's tokens plus the new ones.

    Not covered (no retraction possible): ``clean_up_tokenization_spaces`` on a non-BPE tokenizer, whose
    regexes can join text across a window boundary; and invalid byte sequences in the middle of the output
    with a ``ByteFallback`` decoder, which replaces a whole run of byte tokens, valid characters included.

    ``prompt_ids`` is accepted for interface parity with SGLang/vLLM, which seed the window with the prompt
    tail; it is deliberately unused, because seeding would make a sentencepiece first token keep its leading
    space and break ``text == decode(output_ids)`` (streamed and non-streamed outputs must agree).

    Example::

        >>> detok = IncrementalDetokenizer(tokenizer)
        >>> pieces = [detok.step([tid]) for tid in tokenizer.encode("Hi 👋", add_special_tokens=False)]
        >>> "".join(pieces) == detok.text == "Hi 👋"
        True
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        del prompt_ids  # see class docstring
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text: str | None = ""  # decode(ids[prefix_offset:read_offset]); None = not cached
        self._chunks: list[str] = []  # emitted deltas, joined lazily by `text`
        self._rust = _rust_decoder(tokenizer)  # the same text, without the Python wrapper's overhead

    @property
    def output_ids(self) -> list[int]:
        """All output token ids fed so far (do not mutate)."""
        return self._ids

    @property
    def text(self) -> str:
        """All text emitted so far: the concatenation of every delta returned."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def has_pending(self) -> bool:
        """Whether some fed tokens have not produced text yet (an incomplete character, or no text at all)."""
        return self._read_offset < len(self._ids)

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Feed the next output tokens; return the text they complete (possibly ``""``)."""
        if not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of a request, release held-back text even if it ends in an incomplete character
        (rendered as U+FFFD, as the full decode does)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        prefix_text = self._prefix_text
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith(_REPLACEMENT_CHAR)):
            return ""  # nothing new yet, or the tail is half a character: wait for more tokens
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        self._chunks.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._rust is not None:
            return self._rust.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens,
        )


def _rust_decoder(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer when its ``decode`` is exactly the Rust
    decode: the stock ``decode``/``_decode`` (a subclass may post-process) and no clean-up of tokenization spaces
    (transformers skips it for BPE models anyway). ``spaces_between_special_tokens`` only affects slow tokenizers.
    None otherwise: the detokenizer then calls ``tokenizer.decode``."""
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_fast import PreTrainedTokenizerFast
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    if not isinstance(backend, Tokenizer) or not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    if cls.decode is not PreTrainedTokenizerBase.decode or cls._decode is not PreTrainedTokenizerFast._decode:
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        bpe = type(backend.model).__name__ == "BPE"
        forced = getattr(
            tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True
        )
        if not bpe or forced:
            return None
    return backend
