"""StopChecker: stop strings found across deltas, trimmed, never retracted."""

from __future__ import annotations

import random
import string
import tracemalloc

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


def _longest_held(text: str, stops: list[str]) -> int:
    sizes = [k for s in stops for k in range(1, len(s)) if k <= len(text) and text.endswith(s[:k])]
    return max(sizes, default=0)


def _brute_force(text: str, stops: list[str], no_stop_trim: bool) -> tuple[str, bool, str | None]:
    """Read ``text`` one character at a time and stop at the first one where stop strings end (the longest
    wins): ``(output, stopped, matched)``."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if s and text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return (text[:end] if no_stop_trim else text[: end - len(stop)]), True, stop
    return text, False, None


def _related_stops(rng: random.Random, alphabet: str) -> list[str]:
    """A few random stop strings plus prefixes, suffixes and infixes of them (and the odd duplicate or "")."""
    roots = ["".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
    stops = list(roots)
    for root in roots:
        for _ in range(rng.randint(0, 3)):
            i = rng.randrange(len(root))
            j = rng.randint(i + 1, len(root))
            stops.append(rng.choice([root[:j], root[i:], root[i:j]]))
    if rng.random() < 0.1:
        stops.append(rng.choice(["", stops[0]]))
    rng.shuffle(stops)
    return stops


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_randomized_equivalence_with_brute_force(no_stop_trim: bool) -> None:
    rng = random.Random(2024)
    for case in range(2500):
        alphabet = ("ab", "abc", "ab\xff", "x\U0001f6d1")[case % 4]
        stops = _related_stops(rng, alphabet)
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        cuts = sorted(rng.choices(range(len(text) + 1), k=rng.randint(0, 10)))  # repeats: empty deltas
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        expected, expected_stop, expected_match = _brute_force(text, stops, no_stop_trim)

        checker = StopChecker(stops, no_stop_trim=no_stop_trim)
        emitted, fed = "", ""
        for delta in deltas:
            fed += delta
            piece, stopped = checker.feed(delta)
            emitted += piece
            assert expected.startswith(emitted), (stops, deltas)
            if stopped:
                break
            assert emitted + checker.held == fed
            assert len(checker.held) == _longest_held(fed, stops), (stops, deltas)
        emitted += checker.flush()
        assert (emitted, checker.stopped, checker.matched) == (expected, expected_stop, expected_match), (
            stops,
            deltas,
        )


def test_checkers_of_the_same_stop_strings_keep_their_own_state() -> None:
    first, second = StopChecker(["<|end|>", "<|eot|>"]), StopChecker(["<|end|>", "<|eot|>"])
    assert first.feed("a <|e") == ("a ", False)
    assert second.feed("b <|eo") == ("b ", False)
    assert first.feed("nd|>") == ("", True) and first.matched == "<|end|>"
    assert second.feed("t|> c") == ("", True) and second.matched == "<|eot|>"
    third = StopChecker(["<|end|>", "<|eot|>"])
    assert third.feed("|>") == ("|>", False) and third.held == ""


def test_many_checkers_of_long_stop_strings_stay_small() -> None:
    """128 sequences of a request with 64 stop strings of 1024 characters: the matcher is built once and each
    checker keeps O(longest stop) state (keeping every prefix of every stop took ~37 MiB per checker)."""
    rng = random.Random(64)
    stops = ["".join(rng.choices(string.ascii_letters, k=1024)) for _ in range(64)]
    almost = stops[5][:-1]
    tracemalloc.start()
    try:
        checkers = [StopChecker(stops) for _ in range(128)]
        for checker in checkers:
            assert checker.feed(almost) == ("", False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(checker.held == almost for checker in checkers)
    assert checkers[0].feed(stops[5][-1] + "tail") == ("", True) and checkers[0].matched == stops[5]
    assert checkers[1].feed("!") == (almost + "!", False)
    assert peak < 32 * 2**20, f"{peak / 2**20:.1f} MiB"
