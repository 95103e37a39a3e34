"""``StopChecker`` with stop regexes (SGLang's ``stop_regex``): cut at the first match, held back when the pattern's
matches are bounded, never retracting released text, and safe against catastrophic backtracking."""

from __future__ import annotations

import random
import tracemalloc

import pytest
import regex

from sgl_ray.errors import InvalidRequestError
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.tokenizer.stop import StopChecker


def _run(deltas: list[str], **kw) -> tuple[str, bool, str | None]:
    checker = StopChecker(kw.pop("stops", None), stop_regexes=kw.pop("regexes"), **kw)
    out, stopped = "", False
    for delta in deltas:
        text, stopped = checker.feed(delta)
        out += text
        if stopped:
            break
    if not stopped:
        out += checker.flush()
    return out, stopped, checker.matched


@pytest.mark.parametrize("split", [1, 2, 3, 100])
def test_a_bounded_pattern_cuts_exactly_however_the_text_is_split(split):
    text = "one, two, 3, four"
    deltas = [text[i : i + split] for i in range(0, len(text), split)]
    assert _run(deltas, regexes=[", [0-9]"]) == ("one, two", True, ", [0-9]")
    assert _run(deltas, regexes=[", [0-9]"], no_stop_trim=True) == ("one, two, 3", True, ", [0-9]")


def test_an_unbounded_pattern_never_retracts_released_text():
    assert _run(["Step 1", "2. Then"], regexes=["[0-9]+[.]"]) == ("Step 1", True, "[0-9]+[.]")
    assert _run(["Step 12. Then"], regexes=["[0-9]+[.]"]) == ("Step ", True, "[0-9]+[.]")


def test_anchors_see_the_text_so_far_and_the_first_ending_match_wins():
    assert _run(["Hi there", " you. ", "More"], regexes=[r"[.!?]\s*$"]) == (
        "Hi there you",
        True,
        r"[.!?]\s*$",
    )
    assert _run(["cats and dogs"], stops=["dogs"], regexes=["and"]) == ("cats ", True, "and")
    assert _run(["cats and dogs"], stops=["an"], regexes=["and"]) == ("cats ", True, "an")
    assert _run(["no match here"], regexes=["[0-9]"]) == ("no match here", False, None)


def test_a_pattern_that_backtracks_for_too_long_is_dropped():
    out, stopped, _ = _run(["x" * 3000, "x and"], regexes=["(x+x+)+y", "and"])
    assert stopped and out == "x" * 3001 + " "


def test_sampling_params_check_the_patterns():
    assert SamplingParams(stop_regex="a+").normalized().stop_regex == ["a+"]
    for bad in ("(", "", ["a"] * 65):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(stop_regex=bad).normalized()
        assert info.value.param == "stop_regex"


# Patterns with the longest match each can have (None: unbounded), for the reference's hold-back: bounded,
# unbounded, anchored, with lookarounds and word boundaries.
_PATTERNS: dict[str, int | None] = {
    "ab": 2,
    "a.b": 3,
    r"b\s?a": 3,
    "^ab": 2,
    "^b": 1,
    r"\Aa a": 3,
    "a$": 1,
    r"b\.$": 2,
    r"a\Z": 1,
    "(?m)^b a": 3,
    r"\bab\b": 2,
    r"a\B": 1,
    "b(?=a a)": 1,  # its lookahead reaches past its match
    "(?!a b)b.": 2,
    "(?<=a b)a": 1,
    r"(?<!\.)\.b": 2,
    "(?<=^a)b": 1,
    "(a|b a)b": 4,
    "a+b": None,
    r"[.]\s*$": None,
    r"(ab)+\.": None,
    r"b(?=.*\.)": 1,  # an unbounded lookahead
}


def _reference(patterns: list[str], deltas: list[str], no_stop_trim: bool) -> tuple[str, bool, str | None]:
    """What the checker must produce: every pattern searched over the whole text after each delta, the
    first-ending match cutting it, never before the text already released (everything but the hold-back)."""
    widths = [_PATTERNS[p] for p in patterns]
    hold = max(max(w or 0 for w in widths) - 1, 0) if all(w is not None for w in widths) else 0
    full, released = "", 0
    for delta in deltas:
        full += delta
        best = None
        for p in dict.fromkeys(patterns):
            m = regex.search(p, full)
            if m is not None and (best is None or (m.end(), m.start()) < (best[1], best[0])):
                best = (m.start(), m.end(), p)
        if best is not None:
            return full[: max(best[1] if no_stop_trim else best[0], released)], True, best[2]
        released = max(released, len(full) - hold)
    return full, False, None


def test_the_cut_is_that_of_searching_the_whole_text_after_every_delta():
    rng = random.Random(20240611)
    names = list(_PATTERNS)
    for trial in range(2500):
        patterns = rng.sample(names, rng.randint(1, 3))
        text = "".join(rng.choices("ab .\n", weights=[5, 5, 3, 1, 1], k=rng.randint(0, 80)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        no_stop_trim = rng.random() < 0.3
        expected = _reference(patterns, deltas, no_stop_trim)
        got = _run(deltas, regexes=patterns, no_stop_trim=no_stop_trim)
        assert got == expected, (trial, patterns, deltas, no_stop_trim)


def test_anchors_and_lookbehinds_at_the_edge_of_what_is_kept():
    # ^ and \A match only at the start of the whole text, however far the text has moved on
    filler = [" ab a"] * 200
    assert _run(["ab a", *filler], regexes=["^ab a b"]) == ("ab a" + "".join(filler), False, None)
    assert _run(["x", *filler], regexes=[r"\Aab", "(?<=^a)b"]) == ("x" + "".join(filler), False, None)
    # a lookbehind still sees the text before the delta; a lookahead completed by later deltas still stops the
    # text (where the released text ends: it is never retracted)
    text = "".join(filler)
    assert _run([*filler, " x", "y"], regexes=["(?<=a x)y"]) == (text + " x", True, "(?<=a x)y")
    assert _run([*filler, " ", "x", "y", "z!"], regexes=["a(?= xyz)"]) == (text + " xy", True, "a(?= xyz)")


def test_a_windowed_pattern_keeps_a_bounded_tail_of_a_long_stream():
    """A pattern with bounded matches keeps only what a later match can reach, not the whole output (that was 200
    KiB here, and as much copying per delta)."""
    checker = StopChecker(None, stop_regexes=[r"\bEND\b", "^x", "(?<=a )b"])
    chunk = "word " * 100
    released = 0
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(400):
            text, stopped = checker.feed(chunk)
            released += len(text)
            assert not stopped
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 16 * 2**10, f"{kept / 2**10:.1f} KiB"
    assert released == 400 * len(chunk) - 2  # the hold-back: the longest match less one
    assert checker.feed("EN") == ("d ", False)
    assert checker.feed("D and more") == ("", True) and checker.matched == r"\bEND\b"
