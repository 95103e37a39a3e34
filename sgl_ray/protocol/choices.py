"""Per-choice bookkeeping shared by the chat and completions assemblers: usage over choices, visible logprobs.

Engine outputs are deltas per request (one request per choice); their ``prompt_tokens``, ``completion_tokens``
and ``cached_tokens`` are running totals, so only each choice's latest output counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgl_ray.protocol.logprobs import Logprob
from sgl_ray.protocol.responses import PromptTokensDetails, Usage

if TYPE_CHECKING:
    from sgl_ray.scheduler.output import RequestOutput


class UsageTracker:
    """Usage of a request with ``num_prompts`` prompts × ``n`` choices (choice ``i`` answers prompt ``i // n``).

    Invariant: ``prompt_tokens`` counts each prompt once (the ``n`` samples share it, as OpenAI bills);
    ``completion_tokens`` sums over all choices; ``cached_tokens`` is, per prompt, the smallest cache hit among
    its samples (the first sample's, before it cached the prompt for its siblings).
    """

    def __init__(self, n: int = 1) -> None:
        self._n = max(1, n)
        self._latest: dict[int, tuple[int, int, int]] = {}  # index → (prompt, completion, cached)

    def update(self, index: int, out: RequestOutput) -> None:
        self._latest[index] = (out.prompt_tokens, out.completion_tokens, out.cached_tokens)

    def usage(self) -> Usage:
        prompts: dict[int, tuple[int, int]] = {}
        completion = 0
        for index, (prompt, done, cached) in self._latest.items():
            completion += done
            group = index // self._n
            seen = prompts.get(group)
            prompts[group] = (max(prompt, seen[0]), min(cached, seen[1])) if seen else (prompt, cached)
        prompt_tokens = sum(p for p, _ in prompts.values())
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(c for _, c in prompts.values())),
        )


def visible_logprobs(out: RequestOutput) -> tuple[list[Logprob], list[list[Logprob]] | None]:
    """The output logprobs of ``out`` that belong to rendered text.

    A request that ends on EOS or a stop token id has that token in ``token_ids`` (and in ``completion_tokens``)
    but not in its text; its logprob entry is left out too, so ``logprobs.content`` matches ``content`` as in
    OpenAI's responses. Tokens cut by a stop *string* keep their entries (their text was partly emitted).
    """
    lps = list(out.output_logprobs or [])
    tops = list(out.output_top_logprobs) if out.output_top_logprobs is not None else None
    reason = out.finish_reason
    matched = reason.get("matched") if reason else None
    if (
        lps
        and reason is not None
        and reason.get("type") == "stop"
        and isinstance(matched, int)
        and not isinstance(matched, bool)
        and lps[-1][1] == matched
    ):
        lps.pop()
        if tops is not None:
            tops = tops[: len(lps)]
    return lps, tops


def check_index(index: int, num_choices: int, finished: set[int]) -> None:
    """Reject an output for a choice that does not exist or already finished (a wiring bug, not a 400)."""
    if not 0 <= index < num_choices:
        raise ValueError(f"choice index {index} is outside [0, {num_choices})")
    if index in finished:
        raise ValueError(f"choice {index} already finished")
