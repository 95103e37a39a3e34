"""Engine logprobs (``(logprob, token_id)`` pairs) → OpenAI's chat and legacy-completions logprob shapes.

Token text: what the token alone contributes to the output. For byte-level BPE (GPT-2/Llama-3/SmolLM style) the
token's exact bytes come from the byte alphabet, so ``bytes`` is right even for a token holding half a UTF-8
character (its ``token`` string then shows U+FFFD, as ``tokenizer.decode([id])`` does). For sentencepiece
pieces ``▁`` is a space and ``<0xNN>`` is one byte. Special/added tokens are their literal text. Concatenating
``bytes`` over a response gives the UTF-8 of the generated tokens' text.

``-inf`` logprobs (tokens masked by ``logit_bias``/top-k) are reported as -9999.0 (vLLM's convention): JSON has
no infinity and OpenAI clients expect a number.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from sgl_ray.protocol.responses import ChatLogprobEntry, CompletionLogprobs, TopLogprob

Logprob = tuple[float | None, int]
NEG_INF_LOGPROB = -9999.0
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` table, inverted: printable stand-in character → byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = _byte_level_decoder()


class TokenTexts:
    """Memoized ``token_id → (text, utf8_bytes)`` for one tokenizer (build one per tokenizer and reuse it).

    >>> texts = TokenTexts(tokenizer)  # SmolLM2
    >>> texts(1065)
    (' Al', [32, 65, 108])
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
        self._kind = _decoder_kind(tokenizer)

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        piece = None if token_id in self._added else self._tokenizer.convert_ids_to_tokens(token_id)
        raw: bytes | None = None
        if isinstance(piece, str):
            if self._kind == "byte_level" and all(c in _BYTE_DECODER for c in piece):
                raw = bytes(_BYTE_DECODER[c] for c in piece)
            elif self._kind == "sentencepiece":
                m = _BYTE_PIECE.match(piece)
                raw = bytes([int(m[1], 16)]) if m else piece.replace("▁", " ").encode()
        if raw is not None:
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = self._tokenizer.decode(
            [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return text, list(text.encode())


def _decoder_kind(tokenizer: Any) -> str:
    """``"byte_level"``, ``"sentencepiece"`` or ``"other"`` from the fast tokenizer's decoder pipeline."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return "other"
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # a decoder without a JSON state: fall back to decode()
        return "other"
    parts = state.get("decoders", [state]) if state.get("type") == "Sequence" else [state]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte_level"
    if types & {"Metaspace", "ByteFallback"} or any(p.get("pattern", {}).get("String") == "▁" for p in parts):
        return "sentencepiece"
    return "other"


def _finite(lp: float) -> float:
    return lp if not math.isinf(lp) else NEG_INF_LOGPROB


def chat_logprob_entries(
    texts: TokenTexts, logprobs: Sequence[Logprob], top: Sequence[Sequence[Logprob]] | None
) -> list[ChatLogprobEntry]:
    """One chat ``logprobs.content`` entry per ``(logprob, token_id)``; ``top[i]`` are its alternatives."""
    entries = []
    for i, (lp, tid) in enumerate(logprobs):
        token, raw = texts(tid)
        alts = []
        for alt_lp, alt_id in top[i] if top is not None and i < len(top) else ():
            alt_token, alt_raw = texts(alt_id)
            alts.append(TopLogprob(token=alt_token, logprob=_finite(alt_lp or 0.0), bytes=alt_raw))
        entries.append(
            ChatLogprobEntry(
                token=token, logprob=_finite(lp if lp is not None else 0.0), bytes=raw, top_logprobs=alts
            )
        )
    return entries


def completion_logprobs(
    texts: TokenTexts,
    logprobs: Sequence[Logprob],
    top: Sequence[Sequence[Logprob]] | None,
    text_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """Legacy logprobs for a run of tokens whose text starts at character ``text_offset``; returns them and
    the offset after the run. Offsets advance by each token's text length (as vLLM computes them).

    ``top_logprobs[i]`` holds the alternatives plus the token itself (so up to ``logprobs + 1`` entries, as
    OpenAI documents); a token without a logprob (the first prompt token) has ``None`` in both lists.
    """
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for i, (lp, tid) in enumerate(logprobs):
        token, _ = texts(tid)
        out.tokens.append(token)
        out.text_offset.append(text_offset)
        text_offset += len(token)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(lp))
        alts: dict[str, float] = {}
        for alt_lp, alt_id in top[i] if top is not None and i < len(top) else ():
            alts.setdefault(texts(alt_id)[0], _finite(alt_lp or 0.0))
        alts.setdefault(token, _finite(lp))
        out.top_logprobs.append(alts)
    return out, text_offset
