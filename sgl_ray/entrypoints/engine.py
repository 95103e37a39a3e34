"""``sgl_ray.Engine``: the whole serving engine in this process (no Ray), SGLang's offline-engine API."""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.configs.model_config import ModelConfig, resolve_dtype
from sgl_ray.entrypoints.core import EngineCore, InProcessCore, create_ray_core
from sgl_ray.entrypoints.requests import (
    RequestSpec,
    ResultBuilder,
    normalize_batch,
    per_prompt_lora_names,
    to_sampling_params,
)
from sgl_ray.errors import InvalidRequestError
from sgl_ray.lora.adapter import check_adapter, parse_lora_paths, resolve_max_rank
from sgl_ray.model_loader import (
    WeightStream,
    default_model_path,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from sgl_ray.multimodal.config import check_engine_args
from sgl_ray.multimodal.processor import attach_images, create_processor
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.output import RequestOutput
from sgl_ray.scheduler.request import Req
from sgl_ray.speculative.draft_runner import check_draft_tokenizer

logger = logging.getLogger(__name__)

SamplingArg = SamplingParams | dict | None | Sequence[SamplingParams | dict]


class Engine:
    """An LLM engine with continuous batching, a paged KV cache and RadixAttention prefix caching.

    Example::

        >>> import sgl_ray
        >>> with sgl_ray.Engine() as llm:  # the default SmolLM2-135M-Instruct model
        ...     out = llm.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})
        ...     print(out["text"], out["meta_info"]["finish_reason"])

    ``generate`` takes one prompt (or ``input_ids``) or a list of them, and ``sampling_params`` as a dict,
    :class:`SamplingParams`, or a list matching the prompts. Each result is
    ``{"text", "output_ids", "meta_info": {"id", "prompt_tokens", "completion_tokens", "cached_tokens",
    "finish_reason", "decode_steps", "jump_forward_tokens", ...logprobs, and with speculative decoding
    "spec_verify_ct", "spec_accept_length", ...}}``; with ``n > 1`` the ``n`` samples of
    each prompt follow each other. Structured outputs: ``json_schema``, ``regex`` or ``ebnf`` in the sampling
    params (``generate("A person as JSON:", {"json_schema": {...}})``).
    """

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        args = EngineArgs(model_path=model_path, **kwargs)
        path = args.model_path or str(default_model_path())
        source = resolve_model(path, revision=args.revision, weights=args.load_format != "dummy")
        hf_config = load_hf_config(source)
        self.hf_config = hf_config
        self.args = args = self._resolve_lora(args, hf_config)
        device = args.torch_device()
        self.model_config = ModelConfig(
            hf_config, resolve_dtype(args.dtype, hf_config, device), args.context_length
        )
        self.model_config.check_parallel(args.tp_size, args.ep_size)
        self.tokenizer = None if args.skip_tokenizer_init else load_tokenizer(source, args.tokenizer_path)
        if args.speculative_draft_model_path is not None:
            check_draft_tokenizer(self.tokenizer, args.speculative_draft_model_path)
        self.eos_token_ids = self._eos_ids(self.model_config.eos_token_ids)
        # Vision-language models: the image processor (it runs on the caller's thread, off the step loop)
        check_engine_args(hf_config, args)
        self.image_processor = create_processor(hf_config, source.local_dir)
        self._rng = random.Random(args.random_seed)
        self.model_path = path
        if args.uses_ray:
            self._core: EngineCore = create_ray_core(args.replace(model_path=path), self.model_config)
        else:
            self._core = InProcessCore(args, self.model_config, WeightStream(source), self.tokenizer)

    @staticmethod
    def _resolve_lora(args: EngineArgs, hf_config) -> EngineArgs:
        """Check the start-up adapters and settle ``max_lora_rank`` (the runner sizes its slots by it)."""
        if not args.lora_enabled:
            return args
        rank = resolve_max_rank(args.max_lora_rank, args.lora_paths)
        for path in parse_lora_paths(args.lora_paths).values():
            check_adapter(path, hf_config, rank, allow_pickle=args.lora_allow_pickle)
        return args.replace(max_lora_rank=rank)

    def _eos_ids(self, from_config: tuple[int, ...]) -> tuple[int, ...]:
        ids = set(from_config)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    # --- requests ------------------------------------------------------------------------------------------------
    def _specs(
        self,
        prompt: str | Sequence[str] | None,
        sampling_params: SamplingArg,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None,
        return_logprob: bool,
        logprob_start_len: int,
        top_logprobs_num: int,
        priority: int,
        lora_path: str | Sequence[str | None] | None = None,
        image_data: Any = None,
    ) -> tuple[list[RequestSpec], bool]:
        prompts, token_lists, is_batch = normalize_batch(prompt, input_ids)
        if prompts is not None:
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "text prompts need a tokenizer (skip_tokenizer_init is set)", param="prompt"
                )
            token_lists = [self.tokenizer.encode(p) for p in prompts]
        assert token_lists is not None
        token_lists, images = attach_images(self.image_processor, list(token_lists), image_data, is_batch)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(token_lists):
                raise InvalidRequestError(
                    "sampling_params list must match the number of prompts", param="sampling_params"
                )
            params = [to_sampling_params(p) for p in sampling_params]
        else:
            params = [to_sampling_params(sampling_params)] * len(token_lists)
        if self.tokenizer is None and any(p.stop is not None and len(p.stop) > 0 for p in params):
            raise InvalidRequestError(
                "stop strings need a tokenizer (skip_tokenizer_init is set)", param="stop"
            )
        loras = per_prompt_lora_names(lora_path, len(token_lists))
        specs = [
            RequestSpec(
                ids, p, return_logprob, logprob_start_len, top_logprobs_num, priority, lora, multimodal=mm
            )
            for ids, p, lora, mm in zip(token_lists, params, loras, images, strict=True)
        ]
        return specs, is_batch

    def _submit(self, specs: list[RequestSpec], sink) -> list[list[Req]]:
        vocab = self.model_config.vocab_size
        groups = [s.to_reqs(self.eos_token_ids, self._rng, vocab) for s in specs]
        self._core.add([r for g in groups for r in g], sink)
        return groups

    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        sampling_params: SamplingArg = None,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        stream: bool = False,
        priority: int = 0,
        lora_path: str | Sequence[str | None] | None = None,
        image_data: Any = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate completions (blocking). With ``stream=True`` returns an iterator of chunks whose ``text`` and
        ``output_ids`` are deltas (several requests' chunks interleave; tell them apart by ``meta_info["id"]``).
        ``lora_path`` names a loaded LoRA adapter (one for all prompts, or a list with None for the base model).
        ``image_data`` (vision-language models): the images of a prompt whose text holds one image placeholder
        per image (Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>``), as PIL images, paths, bytes or
        ``data:`` URLs; one image or a list, or for a batch a list of those per prompt (see docs/vision.md)."""
        specs, is_batch = self._specs(
            prompt,
            sampling_params,
            input_ids,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            priority,
            lora_path,
            image_data,
        )
        inbox: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
        groups = self._submit(specs, inbox.put)
        builders = {r.rid: ResultBuilder(r.rid, return_logprob) for g in groups for r in g}
        if stream:
            return self._stream(builders, inbox.get)
        for _ in self._stream(builders, inbox.get):
            pass
        results = [builders[r.rid].result() for g in groups for r in g]
        return results if is_batch or len(results) > 1 else results[0]

    def _stream(self, builders: dict[str, ResultBuilder], get) -> Iterator[dict]:
        pending = set(builders)
        try:
            while pending:
                yield _absorb(builders, pending, get())
        finally:
            for rid in pending:  # the caller stopped early: free the requests' KV
                self._core.abort(rid)

    async def async_generate(
        self,
        prompt: str | Sequence[str] | None = None,
        sampling_params: SamplingArg = None,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        stream: bool = False,
        priority: int = 0,
        lora_path: str | Sequence[str | None] | None = None,
        image_data: Any = None,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """Async ``generate``; with ``stream=True`` returns an async iterator of delta chunks. Images are
        preprocessed in the loop's default executor, not on the event loop."""
        loop = asyncio.get_running_loop()
        specs_of = functools.partial(
            self._specs,
            prompt,
            sampling_params,
            input_ids,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            priority,
            lora_path,
            image_data,
        )
        specs, is_batch = specs_of() if image_data is None else await loop.run_in_executor(None, specs_of)
        inbox: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        groups = self._submit(specs, lambda out: loop.call_soon_threadsafe(inbox.put_nowait, out))
        builders = {r.rid: ResultBuilder(r.rid, return_logprob) for g in groups for r in g}
        if stream:
            return self._astream(builders, inbox)
        async for _ in self._astream(builders, inbox):
            pass
        results = [builders[r.rid].result() for g in groups for r in g]
        return results if is_batch or len(results) > 1 else results[0]

    async def _astream(self, builders: dict[str, ResultBuilder], inbox: asyncio.Queue) -> AsyncIterator[dict]:
        pending = set(builders)
        try:
            while pending:
                yield _absorb(builders, pending, await inbox.get())
        finally:
            for rid in pending:
                self._core.abort(rid)

    async def astream_outputs(
        self,
        input_ids: Sequence[int],
        sampling_params: SamplingParams | dict | None = None,
        *,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
        priority: int = 0,
        lora_path: str | None = None,
        multimodal: Any = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The raw delta stream of one prompt: ``(sample index, RequestOutput)`` for its ``n`` samples, in the
        order the engine produces them (what a server turns into OpenAI chunks). Leaving early aborts them.
        ``multimodal``: the images of ``input_ids`` (placeholders expanded), from the ingress's preprocessing."""
        spec = RequestSpec(
            list(input_ids),
            to_sampling_params(sampling_params),
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            priority,
            lora_path,
            multimodal=multimodal,
        )
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        (reqs,) = self._submit([spec], lambda out: loop.call_soon_threadsafe(inbox.put_nowait, out))
        index = {r.rid: i for i, r in enumerate(reqs)}
        pending = set(index)
        try:
            while pending:
                out = await inbox.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    pending.discard(out.rid)
                yield index[out.rid], out
        finally:
            for rid in pending:
                self._core.abort(rid)

    def abort(self, rid: str) -> None:
        """Abort a request by its ``meta_info["id"]``."""
        self._core.abort(rid)

    # --- LoRA adapters -----------------------------------------------------------------------------------------
    def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> None:
        """Make a PEFT adapter directory available as ``lora_name`` (the engine needs ``enable_lora=True`` or
        ``lora_paths``). Its weights go to a runner slot when a request first uses it (``pinned``: now, and they
        are never evicted). Raises :class:`InvalidRequestError` for a bad adapter or a taken name.

        Example::

            >>> llm = sgl_ray.Engine(model_path, enable_lora=True)  # doctest: +SKIP
            >>> llm.load_lora_adapter("sql", "/adapters/sql")  # doctest: +SKIP
            >>> llm.generate("SELECT", {"max_new_tokens": 8}, lora_path="sql")  # doctest: +SKIP
        """
        if not self.args.lora_enabled:
            raise InvalidRequestError("LoRA is not enabled on this engine (enable_lora)", param="lora_name")
        assert self.args.max_lora_rank is not None
        config = check_adapter(
            lora_path, self.hf_config, self.args.max_lora_rank, allow_pickle=self.args.lora_allow_pickle
        )
        self._core.load_lora_adapter(lora_name, config.path, pinned)

    def unload_lora_adapter(self, lora_name: str) -> bool:
        """Remove an adapter: new requests for it fail at once; requests already using it finish first (then
        the return value is False: deferred). Unknown names raise :class:`ModelNotFoundError`."""
        return self._core.unload_lora_adapter(lora_name)

    def list_lora_adapters(self) -> dict[str, dict]:
        """``{name: {"path", "pinned", "loaded"}}``."""
        return self._core.lora_adapters()

    # --- control -------------------------------------------------------------------------------------------------
    def flush_cache(self) -> bool:
        """Drop the prefix cache. Returns False (nothing done) while requests are running."""
        return self._core.flush_cache()

    def get_stats(self) -> dict[str, Any]:
        """Scheduler counters: running/waiting requests, KV usage, prefix-cache size, preemptions."""
        return self._core.stats()

    def prefix_summary(self, block: int = 32) -> frozenset[int]:
        """Chained hashes of every ``block``-token-aligned prefix in the prefix cache (for cache-aware routing;
        see :mod:`sgl_ray.mem_cache.prefix_hash`)."""
        return self._core.prefix_summary(block)

    def shutdown(self) -> None:
        """Stop the engine; pending requests fail with :class:`~sgl_ray.errors.EngineDeadError`."""
        core = getattr(self, "_core", None)
        if core is not None:
            core.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # interpreter teardown: nothing left to release
            pass


def _absorb(
    builders: dict[str, ResultBuilder], pending: set[str], out: RequestOutput | BaseException
) -> dict:
    """Add one scheduler output to its request's result; returns the streaming chunk (raises engine errors)."""
    if isinstance(out, BaseException):
        raise out
    builder = builders[out.rid]
    builder.add(out)
    if out.finished:
        pending.discard(out.rid)
    return builder.chunk(out)
