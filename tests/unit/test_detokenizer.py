"""IncrementalDetokenizer against tiny real tokenizers trained in-process (no hub, no network).

The core check: for every split of the output ids into steps, the deltas concatenate to
``tokenizer.decode(ids, skip_special_tokens=...)`` and no delta carries half a character.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sgl_ray.tokenizer.detokenizer import IncrementalDetokenizer

SPECIALS = ["<unk>", "<s>", "<|im_end|>"]
# Latin text dominates so the byte-level merges are mostly ASCII and the sentencepiece alphabet (limited
# below) leaves most CJK and emoji to byte fallback; a few of them still become whole tokens.
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Multiple   spaces\tand\nnew\n\nlines here. The end of the line.",
    "def f(x):\n    return x + 1\n",
] * 4 + [
    "Café crème brûlée, naïve résumé — déjà vu.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀 👍🏽 👨‍👩‍👧 🇯🇵 ❤️ and more 🎉",
]
TRICKY = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "double  spaces   and    more",
    "line\nbreak\n\nblank line\n",
    "\ttab\tseparated ",
    "Café crème brûlée, naïve résumé",
    "日本語のテキスト、中文文本。한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 heart ❤️",
    "🦀 crab first, 🦀🦀 twice",
    "math x²+y² ≤ z² ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>"
    )


def _byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 / Llama-3 style: bytes mapped to printable chars, 'Ġ' for space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok)


def _sentencepiece(decoder: str) -> PreTrainedTokenizerFast:
    """Sentencepiece style: '▁' for space, BPE with byte fallback (<0xNN> tokens) for unseen chars.

    ``decoder="metaspace"``: ByteFallback + Metaspace decoder (drops '▁' of the first token).
    ``decoder="llama"``: Llama-2's Replace + ByteFallback + Fuse + Strip(1 leading space).
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, limit_alphabet=45, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # ordinary (non-special) byte tokens, as in Llama's vocab
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    if decoder == "metaspace":
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
        )
    else:
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    return _wrap(tok)


@pytest.fixture(scope="module", params=["byte_level", "sp_metaspace", "sp_llama"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    if request.param == "byte_level":
        return _byte_level()
    return _sentencepiece(request.param.removeprefix("sp_"))


def _enc(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _special(tok: PreTrainedTokenizerFast, name: str) -> int:
    return tok.convert_tokens_to_ids(name)


def _splits(n: int, seed: int) -> list[list[int]]:
    """Chunk sizes covering n tokens: one at a time, all at once, and random chunkings."""
    rng = random.Random(seed)
    out = [[1] * n, [n]]
    for _ in range(4):
        sizes: list[int] = []
        while sum(sizes) < n:
            sizes.append(min(rng.randint(1, 4), n - sum(sizes)))
        out.append(sizes)
    return out


def _stream(tok: PreTrainedTokenizerFast, ids: list[int], sizes: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas, pos = [], 0
    for size in sizes:
        deltas.append(detok.step(ids[pos : pos + size]))
        pos += size
        assert detok.text == "".join(deltas)
    assert detok.flush() == ""  # valid text: nothing may stay held back
    assert detok.output_ids == ids
    return deltas


def _check_all_splits(tok: PreTrainedTokenizerFast, ids: list[int], skip: bool, seed: int = 0) -> None:
    expected = tok.decode(ids, skip_special_tokens=skip)
    assert "\ufffd" not in expected
    for sizes in _splits(len(ids), seed):
        deltas = _stream(tok, ids, sizes, skip)
        assert "".join(deltas) == expected, (sizes, deltas)
        assert all("\ufffd" not in d for d in deltas)


def test_fixture_tokenizers_exercise_the_hard_cases(tokenizer: PreTrainedTokenizerFast) -> None:
    pieces = [tokenizer.decode([i]) for i in _enc(tokenizer, "🦀 日本")]
    assert any("\ufffd" in p for p in pieces)  # some token is half a character on its own


@pytest.mark.parametrize("decoder", ["metaspace", "llama"])
def test_sentencepiece_fixture_has_byte_fallback_and_drops_first_space(decoder: str) -> None:
    tok = _sentencepiece(decoder)
    assert "<0xF0>" in tok.convert_ids_to_tokens(_enc(tok, "🦀"))
    ids = _enc(tok, "Hi there")
    assert tok.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert tok.decode(ids) == "Hi there"  # the first token's '▁' is not a space
    eot = _special(tok, "<|im_end|>")
    assert tok.decode([*ids, eot, *ids], skip_special_tokens=True) == "Hi there Hi there"  # later ones are


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TRICKY)
def test_deltas_concatenate_to_full_decode(tokenizer: PreTrainedTokenizerFast, text: str, skip: bool) -> None:
    _check_all_splits(tokenizer, _enc(tokenizer, text), skip, seed=len(text))


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_anywhere(tokenizer: PreTrainedTokenizerFast, skip: bool) -> None:
    bos, eot = _special(tokenizer, "<s>"), _special(tokenizer, "<|im_end|>")
    cases = [
        [bos, *_enc(tokenizer, "Hello world")],  # special first: next token is the decode's first token
        [*_enc(tokenizer, "Hi"), eot, *_enc(tokenizer, "world")],  # '▁world' right after a skipped special
        [*_enc(tokenizer, "Hi"), eot, eot, bos, *_enc(tokenizer, " two  spaces")],
        [*_enc(tokenizer, "中"), eot, *_enc(tokenizer, "🦀"), eot],
        [eot, bos, *_enc(tokenizer, "😀 x"), eot],
    ]
    for seed, ids in enumerate(cases):
        _check_all_splits(tokenizer, ids, skip, seed)


def test_first_token_leading_space_matches_full_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    for text in ["Hello world", " Hello", "  Hello"]:
        ids = _enc(tokenizer, text)
        detok = IncrementalDetokenizer(tokenizer)
        first = detok.step(ids[:1])
        rest = "".join(detok.step([i]) for i in ids[1:])
        assert first + rest == tokenizer.decode(ids, skip_special_tokens=True)


def test_partial_character_held_until_complete(tokenizer: PreTrainedTokenizerFast) -> None:
    prefix = _enc(tokenizer, "ok")
    crab = _enc(tokenizer, "ok🦀")[len(prefix) :]
    assert len(crab) >= 2  # the crab is split over several tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.step(prefix) == "ok"
    assert [detok.step([i]) for i in crab[:-1]] == [""] * (len(crab) - 1)
    assert detok.has_pending
    assert detok.text == "ok"
    assert detok.step(crab[-1:]) == "🦀"
    assert not detok.has_pending


def test_flush_releases_incomplete_tail(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _enc(tokenizer, "ab🦀")[:-1]  # cut inside the crab's bytes
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.step([i]) for i in ids)
    assert "\ufffd" not in streamed
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert streamed + tail == tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.flush() == ""


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_byte_level(skip: bool) -> None:
    """Arbitrary ids (stray bytes, specials, anything): deltas + flush still equal the full decode."""
    tok = _byte_level()
    rng = random.Random(1234)
    for trial in range(60):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        expected = tok.decode(ids, skip_special_tokens=skip)
        for sizes in _splits(len(ids), trial):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            pos, out = 0, []
            for size in sizes:
                out.append(detok.step(ids[pos : pos + size]))
                pos += size
            out.append(detok.flush())
            assert "".join(out) == expected, ids


def test_random_mixed_sequences(tokenizer: PreTrainedTokenizerFast) -> None:
    """Random concatenations of tricky fragments and special tokens, random splits."""
    rng = random.Random(99)
    specials = [_special(tokenizer, "<s>"), _special(tokenizer, "<|im_end|>")]
    fragments = [_enc(tokenizer, t) for t in TRICKY] + [[s] for s in specials]
    for trial in range(25):
        ids = [i for _ in range(rng.randint(1, 5)) for i in rng.choice(fragments)]
        for skip in (True, False):
            _check_all_splits(tokenizer, ids, skip, seed=trial)


def test_prompt_ids_do_not_change_text(tokenizer: PreTrainedTokenizerFast) -> None:
    prompt, out = _enc(tokenizer, "Question: 日本?"), _enc(tokenizer, "Answer 🦀 done")
    plain = IncrementalDetokenizer(tokenizer)
    seeded = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    assert [plain.step([i]) for i in out] == [seeded.step([i]) for i in out]
    assert seeded.text == tokenizer.decode(out, skip_special_tokens=True)


def test_empty_step_and_empty_output(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.step([]) == ""
    assert detok.text == "" and detok.flush() == "" and not detok.has_pending


class _CountingTokenizer:
    """Delegates to a real tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, inner: PreTrainedTokenizerFast) -> None:
        self.inner = inner
        self.longest = 0
        self.calls = 0

    def decode(self, ids: list[int], **kwargs: bool) -> str:
        self.longest = max(self.longest, len(ids))
        self.calls += 1
        return self.inner.decode(ids, **kwargs)


def test_cost_per_step_is_bounded_by_window(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _enc(tokenizer, " ".join(TRICKY * 8))
    assert len(ids) > 500
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)  # type: ignore[arg-type]
    for i in ids:
        detok.step([i])
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.longest <= 12  # a few tokens of window, however long the output
    assert counting.calls <= 2 * len(ids)


def test_rust_decode_only_where_it_equals_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    """Stock fast tokenizers decode through Rust directly; a subclass that post-processes ``decode`` does not."""
    from sgl_ray.tokenizer.detokenizer import _rust_decoder

    assert _rust_decoder(tokenizer) is tokenizer._tokenizer

    class Shouting(type(tokenizer)):
        def decode(self, *args, **kwargs):
            return super().decode(*args, **kwargs).upper()

    loud = copy.copy(tokenizer)
    loud.__class__ = Shouting
    assert _rust_decoder(loud) is None
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    detok = IncrementalDetokenizer(loud)
    assert "".join(detok.step([t]) for t in ids) + detok.flush() == loud.decode(ids, skip_special_tokens=True)
