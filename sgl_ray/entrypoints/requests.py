"""Turning ``generate`` arguments into scheduler requests, and scheduler outputs into result dicts."""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sgl_ray.errors import InvalidRequestError
from sgl_ray.sampling.params import SamplingParams, shown_value
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.scheduler.request import Req, RequestGroup

_SEED_MIX = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # integers reach the scheduler's int64 arrays and tensors
_MAX_TOP_LOGPROBS_NUM = 20


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
    lora_name: str | None = None  # ``generate``'s lora_path: a loaded adapter's name, None: the base model
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    multimodal: Any = None  # multimodal.MultimodalInputs of input_ids (expanded image placeholders)

    def check(self, vocab_size: int) -> None:
        """Raise :class:`InvalidRequestError` naming the first bad field other than the sampling parameters:
        ``return_logprob`` a bool, ``top_logprobs_num`` in [0, 20], ``logprob_start_len`` in [-1, 2**63),
        ``priority`` within int64 (each an ``int``, not a bool), ``lora_name`` a string or None (param
        ``lora_path``, the ``generate`` argument), and ``input_ids`` a non-empty list of ``int`` token ids in
        ``[0, vocab_size)`` (an empty one is param ``prompt``, as the scheduler names it: a text prompt can encode
        to no tokens)."""
        if not isinstance(self.return_logprob, bool):
            raise InvalidRequestError(
                f"return_logprob must be a bool, got {type(self.return_logprob).__name__}",
                param="return_logprob",
            )
        _check_int(self.top_logprobs_num, "top_logprobs_num", 0, _MAX_TOP_LOGPROBS_NUM)
        _check_int(self.logprob_start_len, "logprob_start_len", -1, _INT64_MAX, high_shown="2**63 - 1")
        _check_int(self.priority, "priority", _INT64_MIN, _INT64_MAX, "-2**63", "2**63 - 1")
        lora = self.lora_name
        if lora is not None and not isinstance(lora, str):
            raise InvalidRequestError(
                f"lora_path must be a LoRA adapter's name (a string) or None, got {type(lora).__name__}",
                param="lora_path",
            )
        ids = self.input_ids
        if not isinstance(ids, (list, tuple)):
            raise InvalidRequestError(
                f"input_ids must be a list of token ids, got {type(ids).__name__}", param="input_ids"
            )
        bad_type = _non_token_type(ids)
        if bad_type is not None:
            raise InvalidRequestError(
                f"input_ids must hold integer token ids, got {bad_type.__name__}", param="input_ids"
            )
        if not ids:  # what the scheduler would reject only once the request is queued
            raise InvalidRequestError(
                "the prompt is empty (it has no tokens; at least one is needed)", param="prompt"
            )
        if min(ids) < 0 or max(ids) >= min(vocab_size, _INT64_MAX + 1):
            raise InvalidRequestError(
                "input_ids contain a token id outside the vocabulary", param="input_ids"
            )

    def to_reqs(self, eos_token_ids: tuple[int, ...], rng: random.Random, vocab_size: int) -> list[Req]:
        """The ``n`` scheduler requests of this prompt; raises :class:`InvalidRequestError` (before building any)
        for a bad field or sampling parameter."""
        p = self.params.normalized()
        p.validate(vocab_size)
        self.check(vocab_size)
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
    """Returns (prompts, token lists, is_batch); exactly one of the first two is set. An empty token list is an
    error (the model needs at least one token); an empty text prompt is not (a tokenizer may add a BOS token: if
    it encodes to no tokens, :meth:`RequestSpec.check` rejects it)."""
    if (prompt is None) == (input_ids is None):
        raise InvalidRequestError("pass exactly one of prompt or input_ids", param="prompt")
    if prompt is not None:
        if isinstance(prompt, str):
            return [prompt], None, False
        if not _is_sequence(prompt) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise InvalidRequestError(
                "prompt must be a string or a non-empty list of strings", param="prompt"
            )
        return list(prompt), None, True
    assert input_ids is not None
    if not _is_sequence(input_ids):
        pass  # an int, a dict, a numpy array (ambiguous truth), a generator: none is a list of token ids
    elif not input_ids:
        raise InvalidRequestError("input_ids is empty: a prompt needs at least one token", param="input_ids")
    elif _non_token_type(input_ids) is None:
        return None, [list(input_ids)], False  # type: ignore[arg-type]
    elif all(isinstance(x, (list, tuple)) and _non_token_type(x) is None for x in input_ids):
        empty = next((i for i, x in enumerate(input_ids) if not x), None)
        if empty is not None:  # the scheduler would reject it only once the batch is queued
            raise InvalidRequestError(
                f"input_ids[{empty}] is empty: a prompt needs at least one token", param="input_ids"
            )
        return None, [list(x) for x in input_ids], True  # type: ignore[union-attr]
    raise InvalidRequestError(
        "input_ids must be a list of ints or a list of lists of ints", param="input_ids"
    )


def per_prompt_lora_names(lora_path: Any, count: int) -> list[str | None]:
    """The adapter of each of ``count`` prompts from ``generate``'s ``lora_path``: None (the base model) or one
    adapter name for all, or a list (tuple) of one name or None per prompt; else :class:`InvalidRequestError`
    naming ``lora_path``.

    >>> per_prompt_lora_names("sql", 2), per_prompt_lora_names(["sql", None], 2)
    (['sql', 'sql'], ['sql', None])
    """
    if lora_path is None or isinstance(lora_path, str):
        return [lora_path] * count
    if not isinstance(lora_path, (list, tuple)):
        raise InvalidRequestError(
            "lora_path must be a LoRA adapter's name (a string), None, or a list of those (one per prompt), "
            f"got {type(lora_path).__name__}",
            param="lora_path",
        )
    if len(lora_path) != count:
        raise InvalidRequestError(
            f"lora_path list must match the number of prompts (it has {len(lora_path)} entries for {count})",
            param="lora_path",
        )
    for i, name in enumerate(lora_path):
        if name is not None and not isinstance(name, str):
            raise InvalidRequestError(
                f"lora_path[{i}] must be a LoRA adapter's name (a string) or None, got {type(name).__name__}",
                param="lora_path",
            )
    return list(lora_path)


def _is_int(x: Any) -> bool:
    """An ``int`` and not a bool (nor a float or a numpy integer)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _non_token_type(ids: Sequence[Any]) -> type | None:
    """The type of an element of ``ids`` that is no token id (see :func:`_is_int`), or None if all are (the types
    are collected at C speed: prompts can be long)."""
    for kind in set(map(type, ids)):
        if not issubclass(kind, int) or issubclass(kind, bool):
            return kind
    return None


def _is_sequence(x: Any) -> bool:
    """A list-like of prompts or token ids: not a string (of characters) or bytes (of ints), nor a mapping, set,
    generator or numpy array (not a ``Sequence``; and an array's truth value is an error)."""
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes, bytearray))


def _check_int(
    value: Any, param: str, low: int, high: int, low_shown: str | None = None, high_shown: str | None = None
) -> None:
    """An :class:`InvalidRequestError` naming ``param`` unless ``value`` is an ``int`` in ``[low, high]``."""
    if _is_int(value) and low <= value <= high:
        return
    got = shown_value(value) if _is_int(value) else type(value).__name__  # a huge integer by its size
    raise InvalidRequestError(
        f"{param} must be an integer in [{low_shown or low}, {high_shown or high}], got {got}", param=param
    )
