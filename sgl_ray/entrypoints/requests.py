"""Turning ``generate`` arguments into scheduler requests, and scheduler outputs into result dicts."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sgl_ray.errors import InvalidRequestError
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.scheduler.request import Req, RequestGroup

_SEED_MIX = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


def child_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th sample of an ``n > 1`` request (index 0 keeps the user's seed)."""
    return seed if index == 0 else (seed ^ (index * _SEED_MIX)) & _SEED_MASK


def to_sampling_params(p: SamplingParams | dict | None) -> SamplingParams:
    if p is None:
        return SamplingParams()
    if isinstance(p, SamplingParams):
        return p
    if not isinstance(p, dict):
        raise InvalidRequestError(f"sampling_params must be a dict or SamplingParams, got {type(p).__name__}")
    try:
        import msgspec

        return msgspec.convert(p, SamplingParams, strict=False)
    except msgspec.ValidationError as e:
        raise InvalidRequestError(f"sampling_params: {e}", param="sampling_params") from None


@dataclass
class RequestSpec:
    """One prompt of a ``generate`` call before it becomes ``n`` scheduler requests."""

    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    priority: int = 0
    lora_name: str | None = None
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    multimodal: Any = None  # multimodal.MultimodalInputs of input_ids (expanded image placeholders)

    def to_reqs(self, eos_token_ids: tuple[int, ...], rng: random.Random, vocab_size: int) -> list[Req]:
        p = self.params.normalized()
        p.validate(vocab_size)
        if self.top_logprobs_num < 0 or self.top_logprobs_num > 20:
            raise InvalidRequestError("top_logprobs_num must be in [0, 20]", param="top_logprobs_num")
        if any(t < 0 or t >= vocab_size for t in self.input_ids):
            raise InvalidRequestError(
                "input_ids contain a token id outside the vocabulary", param="input_ids"
            )
        mm = self.multimodal
        prompt_ids = mm.keyed_ids(self.input_ids, vocab_size) if mm is not None else self.input_ids
        base_seed = p.seed if p.seed is not None else rng.getrandbits(63)
        group = RequestGroup() if p.n > 1 else None
        reqs = []
        for i in range(p.n):
            reqs.append(
                Req(
                    rid=self.rid if p.n == 1 else f"{self.rid}-{i}",
                    prompt_ids=list(prompt_ids),
                    sampling=p,
                    seed=child_seed(base_seed, i),
                    eos_token_ids=eos_token_ids,
                    return_logprob=self.return_logprob,
                    top_logprobs_num=self.top_logprobs_num if self.return_logprob else 0,
                    logprob_start_len=self.logprob_start_len if self.return_logprob else -1,
                    priority=self.priority,
                    extra_key=self.lora_name,  # KV computed under an adapter is only shared under it
                    lora_name=self.lora_name,
                    group=group,
                    multimodal=mm,
                )
            )
        return reqs


class ResultBuilder:
    """Accumulates one request's outputs into SGLang-style ``{"text", "output_ids", "meta_info"}`` dicts."""

    def __init__(self, rid: str, return_logprob: bool) -> None:
        self.rid = rid
        self.text = ""
        self.output_ids: list[int] = []
        self.return_logprob = return_logprob
        self.output_logprobs: list[Any] = []
        self.output_top_logprobs: list[Any] = []
        self.input_logprobs: list[Any] = []
        self.input_top_logprobs: list[Any] = []
        self.last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.output_ids.extend(out.token_ids)
        self.output_logprobs.extend(out.output_logprobs or [])
        self.output_top_logprobs.extend(out.output_top_logprobs or [])
        self.input_logprobs.extend(out.input_logprobs or [])
        self.input_top_logprobs.extend(out.input_top_logprobs or [])
        self.last = out

    def meta_info(self, out: RequestOutput) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.rid,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
            "finish_reason": out.finish_reason,
            "decode_steps": out.decode_steps,
            "jump_forward_tokens": out.jump_forward_tokens,
        }
        if out.spec_verify_ct is not None:  # speculative decoding (SGLang's fields and definitions)
            verify_ct, proposed = out.spec_verify_ct, out.spec_proposed_drafts
            meta["spec_verify_ct"] = verify_ct
            meta["spec_accept_length"] = out.completion_tokens / verify_ct if verify_ct else 0.0
            meta["spec_accept_rate"] = out.spec_accepted_drafts / proposed if proposed else 0.0
            meta["spec_accepted_drafts"] = out.spec_accepted_drafts
            meta["spec_proposed_drafts"] = proposed
        if self.return_logprob:
            meta["output_token_logprobs"] = self.output_logprobs
            meta["output_top_logprobs"] = self.output_top_logprobs
            meta["input_token_logprobs"] = self.input_logprobs
            meta["input_top_logprobs"] = self.input_top_logprobs
        return meta

    def result(self) -> dict[str, Any]:
        assert self.last is not None
        return {
            "text": self.text,
            "output_ids": list(self.output_ids),
            "meta_info": self.meta_info(self.last),
        }

    def chunk(self, out: RequestOutput) -> dict[str, Any]:
        """A streaming chunk: ``text``/``output_ids`` are this step's delta; ``meta_info`` is cumulative."""
        return {"text": out.text, "output_ids": list(out.token_ids), "meta_info": self.meta_info(out)}


def normalize_batch(
    prompt: str | Sequence[str] | None, input_ids: Sequence[int] | Sequence[Sequence[int]] | None
) -> tuple[list[str] | None, list[list[int]] | None, bool]:
    """Returns (prompts, token lists, is_batch); exactly one of the first two is set."""
    if (prompt is None) == (input_ids is None):
        raise InvalidRequestError("pass exactly one of prompt or input_ids", param="prompt")
    if prompt is not None:
        if isinstance(prompt, str):
            return [prompt], None, False
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise InvalidRequestError(
                "prompt must be a string or a non-empty list of strings", param="prompt"
            )
        return list(prompt), None, True
    assert input_ids is not None
    if input_ids and all(isinstance(t, int) for t in input_ids):
        return None, [list(input_ids)], False  # type: ignore[arg-type]
    if input_ids and all(
        isinstance(x, (list, tuple)) and all(isinstance(t, int) for t in x) for x in input_ids
    ):
        return None, [list(x) for x in input_ids], True  # type: ignore[union-attr]
    raise InvalidRequestError(
        "input_ids must be a list of ints or a list of lists of ints", param="input_ids"
    )
