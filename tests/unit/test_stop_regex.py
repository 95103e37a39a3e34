"""``StopChecker`` with stop regexes (SGLang's ``stop_regex``): cut at the first match, held back when the pattern's
matches are bounded, never retracting released text, and safe against catastrophic backtracking."""

from __future__ import annotations

import pytest

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
