"""How ``select`` turns per-token logprobs of each choice into a decision.

A method gets, for each choice, the logprobs of the choice's own tokens given the prompt (``conditional``) and —
if it asks for them with ``needs_unconditional`` — given only a neutral context (``unconditional``). Tokens are
the tokens of ``prompt + choice`` past the tokens ``prompt`` alone shares with it, so a choice that merges with the
prompt's last token at the boundary is scored on what it actually adds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple


class ChoiceDecision(NamedTuple):
    index: int
    scores: list[float]  # one per choice: what the method compared (higher is better)


class ChoicesMethod(ABC):
    """Contract: ``decide(conditional, unconditional)`` returns the index of the chosen choice and the score
    of every choice; ``conditional[i]`` is a non-empty list of logprobs of choice ``i``'s tokens."""

    needs_unconditional: bool = False

    @abstractmethod
    def decide(
        self, conditional: Sequence[Sequence[float]], unconditional: Sequence[Sequence[float]] | None = None
    ) -> ChoiceDecision: ...

    def __repr__(self) -> str:
        return type(self).__name__


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _argmax(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the first choice


class TokenLengthNormalized(ChoicesMethod):
    """The choice with the highest mean token logprob (the default)."""

    def decide(self, conditional, unconditional=None) -> ChoiceDecision:
        scores = [_mean(lp) for lp in conditional]
        return ChoiceDecision(_argmax(scores), scores)


class GreedyTokenSelection(ChoicesMethod):
    """The choice whose first token is most likely; choices that tie there (one a prefix of another) are compared
    token by token, a shorter choice padded with its own mean logprob."""

    def decide(self, conditional, unconditional=None) -> ChoiceDecision:
        width = max(len(lp) for lp in conditional)
        rows = [list(lp) + [_mean(lp)] * (width - len(lp)) for lp in conditional]
        alive = list(range(len(rows)))
        for col in range(width):
            best = max(rows[i][col] for i in alive)
            alive = [i for i in alive if rows[i][col] >= best - 1e-9]
            if len(alive) == 1:
                break
        return ChoiceDecision(alive[0], [r[0] for r in rows])


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The choice with the highest mean of ``logP(token | prompt) - logP(token | neutral context)`` — it discounts
    choices that are likely anywhere (one extra scoring call)."""

    needs_unconditional = True

    def decide(self, conditional, unconditional=None) -> ChoiceDecision:
        if unconditional is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional logprobs")
        scores = []
        for cond, uncond in zip(conditional, unconditional, strict=True):
            n = min(len(cond), len(uncond))
            scores.append(_mean([c - u for c, u in zip(cond[-n:], uncond[-n:], strict=True)]))
        return ChoiceDecision(_argmax(scores), scores)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()


def decision_meta(choices: Sequence[str], decision: ChoiceDecision, conditional: Any) -> dict[str, Any]:
    """What ``s.get_meta_info(name)`` holds for a ``select``."""
    return {
        "choice": choices[decision.index],
        "scores": dict(zip(choices, decision.scores, strict=True)),
        "token_logprobs": {c: list(lp) for c, lp in zip(choices, conditional, strict=True)},
    }
