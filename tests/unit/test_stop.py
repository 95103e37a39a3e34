"""StopChecker: stop strings found across deltas, trimmed, never retracted."""

from __future__ import annotations

import random

import pytest

from sgl_ray.tokenizer.stop import StopChecker, StopResult


def _run(stops: list[str] | None, deltas: list[str], no_stop_trim: bool = False) -> tuple[list[str], bool]:
    """Feed every delta (until stopped), then flush; return the emitted pieces and whether it stopped."""
    checker = StopChecker(stops, no_stop_trim=no_stop_trim)
    out: list[str] = []
    for delta in deltas:
        text, stopped = checker.feed(delta)
        out.append(text)
        if stopped:
            return out, True
    out.append(checker.flush())
    return out, False


def test_stop_inside_one_delta() -> None:
    checker = StopChecker(["STOP"])
    assert checker.feed("hello STOP world") == StopResult("hello ", True)
    assert checker.stopped and checker.matched == "STOP"
    assert checker.feed("more") == StopResult("", True)
    assert checker.flush() == ""


def test_stop_spanning_deltas() -> None:
    checker = StopChecker(["STOP"])
    assert checker.feed("hel") == ("hel", False)
    assert checker.feed("lo S") == ("lo ", False)
    assert checker.held == "S"
    assert checker.feed("TO") == ("", False)
    assert checker.held == "STO"
    assert checker.feed("P and more") == ("", True)


def test_stop_at_very_start() -> None:
    assert StopChecker(["<end>"]).feed("<end>rest") == ("", True)
    assert _run(["<end>"], ["<", "e", "nd>rest"]) == (["", "", ""], True)


def test_no_stop_trim_keeps_stop_string_and_nothing_after() -> None:
    assert StopChecker(["STOP"], no_stop_trim=True).feed("hello STOP world") == ("hello STOP", True)
    out, stopped = _run(["STOP"], ["hel", "lo ST", "OP", " world"], no_stop_trim=True)
    assert stopped and "".join(out) == "hello STOP"


def test_overlapping_candidates() -> None:
    # "ab" and "b" both end at the same character: the longer one wins, for any chunking.
    for deltas in (["xab"], ["x", "a", "b"], ["xa", "b"]):
        assert "".join(_run(["ab", "b"], deltas)[0]) == "x"
        assert "".join(_run(["ab", "b"], deltas, no_stop_trim=True)[0]) == "xab"
    assert "".join(_run(["ab", "b"], ["xb"])[0]) == "x"
    out, stopped = _run(["ab", "b"], ["xa", "c"])
    assert out == ["x", "ac", ""] and not stopped  # held "a" released once it cannot start "ab"


def test_multiple_stop_strings_earliest_wins() -> None:
    assert StopChecker(["world", "lo"]).feed("hello world") == ("hel", True)
    assert StopChecker(["\n\n", "###"]).feed("a ### b\n\n") == ("a ", True)
    # A stop contained inside a longer one ends first, so it wins however the text is chunked.
    for deltas in (["xabcd"], list("xabcd"), ["xab", "cd"]):
        assert "".join(_run(["abcd", "c"], deltas)[0]) == "xab"


def test_held_tail_released_when_not_a_stop() -> None:
    checker = StopChecker(["</s>"])
    assert checker.feed("a<") == ("a", False)
    assert checker.feed("/") == ("", False)
    assert checker.held == "</"
    assert checker.feed("b") == ("</b", False)
    assert checker.held == ""
    # The held tail shrinks to the longest suffix that is still a prefix: "<<" -> keep "<".
    assert checker.feed("<<") == ("<", False)
    assert checker.held == "<"


def test_flush_releases_held_text() -> None:
    checker = StopChecker(["<|end|>"])
    assert checker.feed("answer <|en") == ("answer ", False)
    assert checker.flush() == "<|en"
    assert checker.flush() == ""
    assert not checker.stopped and checker.matched is None


@pytest.mark.parametrize("stops", [None, [], [""]])
def test_no_stop_strings_pass_through(stops: list[str] | None) -> None:
    checker = StopChecker(stops)
    assert checker.feed("anything <") == ("anything <", False)
    assert checker.flush() == ""


def test_unicode_stop_strings() -> None:
    out, stopped = _run(["。\n", "🛑"], ["日本", "語。", "\n続き"])
    assert stopped and "".join(out) == "日本語"
    out, stopped = _run(["👨‍👩‍👧"], ["a👨\u200d", "👩\u200d", "👦"])  # ZWJ sequence that diverges at the end
    assert not stopped and "".join(out) == "a👨\u200d👩\u200d👦"


def _reference(text: str, stops: list[str], no_stop_trim: bool) -> str:
    """Brute force: the first position at which the text read so far ends with a stop string."""
    for end in range(1, len(text) + 1):
        for stop in sorted((s for s in stops if s), key=len, reverse=True):
            if text[:end].endswith(stop):
                return text[:end] if no_stop_trim else text[: end - len(stop)]
    return text


def _longest_held(text: str, stops: list[str]) -> int:
    sizes = [k for s in stops for k in range(1, len(s)) if k <= len(text) and text.endswith(s[:k])]
    return max(sizes, default=0)


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_randomized_concatenation_invariant(no_stop_trim: bool) -> None:
    rng = random.Random(7)
    alphabet = "ab c\n"
    for _ in range(1500):
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        expected = _reference(text, stops, no_stop_trim)

        checker = StopChecker(stops, no_stop_trim=no_stop_trim)
        emitted, fed = "", ""
        for delta in deltas:
            fed += delta
            piece, stopped = checker.feed(delta)
            emitted += piece
            assert expected.startswith(emitted)  # never emits text that a later stop would remove
            if stopped:
                break
            assert len(emitted) == len(fed) - _longest_held(fed, stops)  # holds back no more than needed
        else:
            emitted += checker.flush()
        assert emitted == expected, (stops, deltas)
        assert checker.stopped == any(s in text for s in stops)
