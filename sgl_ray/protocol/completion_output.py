"""Engine outputs → legacy ``text_completion`` responses: streamed chunks or one final body.

A request with ``P`` prompts and ``n`` samples has ``P * n`` choices; choice ``i`` answers prompt ``i // n``
(OpenAI's order). With ``echo`` a choice's text starts with its prompt's text, and with ``logprobs`` its
logprobs start with the prompt's tokens (the first one with null entries); ask the engine for them with
:func:`~sgl_ray.protocol.sampling.logprob_options`.

Streaming invariants, per choice: chunks carry text deltas (the first one prefixed by the echoed prompt) and
their logprobs; exactly one chunk with ``text: ""`` carries the ``finish_reason``; the texts concatenate to the
non-streamed ``text``. With ``include_usage`` every chunk has ``"usage": null`` and :meth:`finish` adds a last
chunk with ``choices: []`` and the usage; with ``continuous_usage`` too, every chunk carries the usage so far.
``matched_stop`` is in the finishing chunk and in every choice of a whole response.

``prompt_logprobs`` (vLLM's): each choice carries its prompt's logprobs, one entry per prompt token (the first
null), each ``{token id: {"logprob", "rank", "decoded_token"}}`` holding the prompt's token and the top
alternatives (``rank`` is the token's 1-based rank among the alternatives, null when it is not among them); ask
the engine for them with :func:`~sgl_ray.protocol.sampling.logprob_options`. A stream sends them in each
choice's first chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from msgspec import UNSET

from sgl_ray.protocol.choices import UsageTracker, check_index, visible_logprobs
from sgl_ray.protocol.logprobs import Logprob, TokenTexts, completion_logprobs
from sgl_ray.protocol.requests import CompletionRequest
from sgl_ray.protocol.responses import (
    COMPLETION_ID_PREFIX,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    PromptLogprob,
    matched_stop,
    new_request_id,
    now,
    openai_finish_reason,
)

if TYPE_CHECKING:
    from sgl_ray.scheduler.output import RequestOutput

_T = TypeVar("_T", bound="_CompletionChoices")


class _CompletionChoices:
    """What both assemblers share: the response header, echo, logprob offsets, usage."""

    def __init__(
        self,
        *,
        model: str,
        n: int = 1,
        num_prompts: int = 1,
        logprobs: int | None = None,
        echo: bool = False,
        prompt_texts: Sequence[str] | None = None,
        token_texts: TokenTexts | None = None,
        request_id: str | None = None,
        created: int | None = None,
        system_fingerprint: str | None = None,
        prompt_logprobs: int | None = None,
        prompts: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if (logprobs is not None or prompt_logprobs is not None) and token_texts is None:
            raise ValueError("logprobs need token_texts (a TokenTexts for the model's tokenizer)")
        if prompt_logprobs is not None and (prompts is None or len(prompts) != num_prompts):
            raise ValueError("prompt_logprobs need the prompts' token ids, one list per prompt")
        if echo and (prompt_texts is None or len(prompt_texts) != num_prompts):
            raise ValueError("echo needs prompt_texts, one per prompt")
        self.model = model
        self.n = n
        self.num_choices = n * num_prompts
        self.id = request_id or new_request_id(COMPLETION_ID_PREFIX)
        self.created = created if created is not None else now()
        self.system_fingerprint = system_fingerprint if system_fingerprint is not None else UNSET
        self._logprobs = logprobs
        self._echo = echo
        self._prompt_texts = list(prompt_texts or [])
        self._texts = token_texts
        self._seen: set[int] = set()
        self._finished: set[int] = set()
        self._offsets: dict[int, int] = {}
        self._usage = UsageTracker(n)
        self._prompt_top = prompt_logprobs
        self._prompts = [list(p) for p in prompts or []]
        self._prompt_lps: dict[int, list[Logprob]] = {}
        self._prompt_tops: dict[int, list[list[Logprob]]] = {}

    @classmethod
    def from_request(
        cls: type[_T],
        req: CompletionRequest,
        *,
        model: str,
        prompt_texts: Sequence[str] | None = None,
        token_texts: TokenTexts | None = None,
        **kw: Any,
    ) -> _T:
        """Configured from ``req``. ``prompt_texts`` (one per prompt; token-id prompts decoded) are needed
        for ``echo``, ``prompts`` (token ids, one list per prompt) for ``prompt_logprobs``."""
        texts, token_lists = req.prompt_batch()
        num_prompts = len(texts) if texts is not None else len(token_lists or [])
        if prompt_texts is None and req.echo and texts is not None:
            prompt_texts = texts
        return cls(
            model=model,
            n=req.n or 1,
            num_prompts=num_prompts,
            logprobs=req.logprobs,
            echo=bool(req.echo),
            prompt_texts=prompt_texts,
            token_texts=token_texts,
            prompt_logprobs=req.prompt_logprobs,
            **kw,
        )

    @property
    def done(self) -> bool:
        """Whether every choice has finished."""
        return len(self._finished) == self.num_choices

    def _absorb(self, index: int, out: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        """This output's text (with the echoed prompt first, once) and legacy logprobs."""
        check_index(index, self.num_choices, self._finished)
        first = index not in self._seen
        self._seen.add(index)
        self._usage.update(index, out)
        if out.finished:
            self._finished.add(index)
        text = self._prompt_texts[index // self.n] + out.text if self._echo and first else out.text
        if self._prompt_top is not None and out.input_logprobs:
            self._prompt_lps.setdefault(index, []).extend(out.input_logprobs)
            self._prompt_tops.setdefault(index, []).extend(
                out.input_top_logprobs or [[] for _ in out.input_logprobs]
            )
        if self._logprobs is None:
            return text, None
        assert self._texts is not None
        lps, tops = visible_logprobs(out)
        all_lps: list[Logprob] = []
        all_tops: list[list[Logprob]] = []
        if (
            self._echo and out.input_logprobs
        ):  # (logprob_options asks for them with echo only, or prompt_logprobs)
            all_lps += out.input_logprobs
            all_tops += out.input_top_logprobs or [[] for _ in out.input_logprobs]
        all_lps += lps
        all_tops += tops if tops is not None else [[] for _ in lps]
        all_tops = [top[: self._logprobs] for top in all_tops]  # prompt_logprobs may have asked for more
        logprobs, self._offsets[index] = completion_logprobs(
            self._texts, all_lps, all_tops, self._offsets.get(index, 0)
        )
        return text, logprobs

    def _matched(self, out: RequestOutput) -> int | str | None:
        return matched_stop(out.finish_reason)

    def _prompt_logprobs(self, index: int) -> list[dict[str, PromptLogprob] | None]:
        """vLLM's ``prompt_logprobs`` of choice ``index``: null for the first prompt token, then per token its own
        entry and its top alternatives."""
        assert self._texts is not None and self._prompt_top is not None
        ids = self._prompts[index // self.n]
        lps = self._prompt_lps.get(index, [])
        tops = self._prompt_tops.get(index, [])
        out: list[dict[str, PromptLogprob] | None] = [None]
        for pos in range(1, len(ids)):
            entry: dict[str, PromptLogprob] = {}
            top = tops[pos] if pos < len(tops) else []
            for rank, (lp, tid) in enumerate(top[: self._prompt_top], start=1):
                entry[str(tid)] = PromptLogprob(
                    logprob=_finite(lp), rank=rank, decoded_token=self._texts(tid)[0]
                )
            token = ids[pos]
            if str(token) not in entry and pos < len(lps):
                ranks = [tid for _, tid in top]
                entry[str(token)] = PromptLogprob(
                    logprob=_finite(lps[pos][0]),
                    rank=ranks.index(token) + 1 if token in ranks else None,
                    decoded_token=self._texts(token)[0],
                )
            out.append(entry)
        return out


class CompletionStreamAssembler(_CompletionChoices):
    """Turns engine outputs into streamed ``text_completion`` chunks (encode each with ``sse_event``).

    Example::

        >>> asm = CompletionStreamAssembler(model="m", n=1, include_usage=True)
        >>> chunks = [c for index, out in engine_outputs for c in asm.add(index, out)]  # doctest: +SKIP
        >>> chunks += asm.finish()  # doctest: +SKIP
    """

    def __init__(self, *, include_usage: bool = False, continuous_usage: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.include_usage = include_usage
        self.continuous_usage = include_usage and continuous_usage
        self._prompt_sent: set[int] = set()

    @classmethod
    def from_request(
        cls, req: CompletionRequest, *, model: str, prompt_texts: Sequence[str] | None = None, **kw: Any
    ) -> CompletionStreamAssembler:
        kw.setdefault("include_usage", req.include_usage)
        kw.setdefault("continuous_usage", req.continuous_usage)
        return super().from_request(req, model=model, prompt_texts=prompt_texts, **kw)

    def add(self, index: int, out: RequestOutput) -> list[CompletionChunk]:
        """The chunks for one engine output of choice ``index``."""
        text, logprobs = self._absorb(index, out)
        chunks = []
        choice = CompletionChoice(text=text, index=index, logprobs=logprobs)
        if (
            self._prompt_top is not None
            and index not in self._prompt_sent
            and (out.token_ids or out.finished)
        ):
            self._prompt_sent.add(index)  # the prompt is whole once the first token (or the end) comes
            choice.prompt_logprobs = self._prompt_logprobs(index)
        if text or (logprobs is not None and logprobs.tokens) or choice.prompt_logprobs:
            chunks.append(self._chunk(choice))
        if out.finished:
            reason = openai_finish_reason(out.finish_reason)
            finish = CompletionChoice(
                text="", index=index, finish_reason=reason, matched_stop=self._matched(out)
            )
            chunks.append(self._chunk(finish))
        return chunks

    def finish(self) -> list[CompletionChunk]:
        """The usage chunk when ``include_usage``, else nothing (then send ``SSE_DONE``)."""
        if not self.include_usage:
            return []
        return [
            CompletionChunk(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[],
                system_fingerprint=self.system_fingerprint,
                usage=self._usage.usage(),
            )
        ]

    def _chunk(self, choice: CompletionChoice) -> CompletionChunk:
        return CompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            system_fingerprint=self.system_fingerprint,
            usage=(self._usage.usage() if self.continuous_usage else None) if self.include_usage else UNSET,
        )


class CompletionResponseBuilder(_CompletionChoices):
    """Accumulates engine outputs into one ``text_completion`` body (choices in index order)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._text: dict[int, list[str]] = {}
        self._lps: dict[int, CompletionLogprobs] = {}
        self._reason: dict[int, str | None] = {}
        self._matched_stop: dict[int, int | str | None] = {}

    def add(self, index: int, out: RequestOutput) -> None:
        text, logprobs = self._absorb(index, out)
        self._text.setdefault(index, []).append(text)
        if logprobs is not None:
            acc = self._lps.setdefault(index, _empty_logprobs())
            acc.tokens += logprobs.tokens
            acc.token_logprobs += logprobs.token_logprobs
            acc.top_logprobs += logprobs.top_logprobs
            acc.text_offset += logprobs.text_offset
        if out.finished:
            self._reason[index] = openai_finish_reason(out.finish_reason)
            self._matched_stop[index] = self._matched(out)

    def build(self) -> CompletionResponse:
        choices = [
            CompletionChoice(
                text="".join(self._text.get(i, [])),
                index=i,
                logprobs=self._lps.get(i, _empty_logprobs()) if self._logprobs is not None else None,
                finish_reason=self._reason.get(i),
                matched_stop=self._matched_stop.get(i),
            )
            for i in range(self.num_choices)
        ]
        if self._prompt_top is not None:
            for choice in choices:
                choice.prompt_logprobs = self._prompt_logprobs(choice.index)
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self._usage.usage(),
            system_fingerprint=self.system_fingerprint,
        )


def _finite(logprob: float | None) -> float:
    """A logprob for JSON (-inf, which JSON cannot hold, as vLLM's -9999.0)."""
    return -9999.0 if logprob is None or logprob == float("-inf") else float(logprob)


def _empty_logprobs() -> CompletionLogprobs:
    return CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
