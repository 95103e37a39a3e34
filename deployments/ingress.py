"""``OpenAIIngress``: the HTTP front of the Serve app — OpenAI-compatible routes plus SGLang's native ones.

It tokenizes once (chat templates included), validates, and streams each prompt from an ``LLMServer`` replica
chosen by the cache-aware router on the prompt's token ids. A client that disconnects cancels its stream, which
aborts the request and frees its KV. Every bad request gets an OpenAI-style ``{"error": …}`` with a 4xx.

Decoding, templates and tokenizing (:class:`~sgl_ray.deployments.preprocess.Preprocessor`) run in a thread pool
(``tokenizer_threads``), never on the event loop, so a big request does not hold up ``/health`` or other streams.
JSON bodies must be sent as ``application/json`` (415 otherwise): a web page cannot post one cross-site without
the browser asking first.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
import torch
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from sgl_ray import protocol as P
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.deployments.lora import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from sgl_ray.deployments.lora import decode as decode_lora
from sgl_ray.deployments.lora_ingress import IngressAdapters
from sgl_ray.deployments.metrics import Metrics
from sgl_ray.deployments.preprocess import Preprocessor
from sgl_ray.deployments.responses import (
    HTTPError,
    Latency,
    NativeResult,
    assembled_response,
    json_response,
    native_response,
    primed,
    unwrap,
)
from sgl_ray.errors import SglRayError
from sgl_ray.lang.template import role_format_from_tokenizer
from sgl_ray.lora.adapter import parse_lora_paths
from sgl_ray.model_loader import load_hf_config, load_tokenizer, resolve_model
from sgl_ray.reasoning import get_reasoning_parser

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")
DEFAULT_TOKENIZER_THREADS = 2


def is_json_media_type(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` header names JSON (``application/json`` or ``application/<x>+json``, with any
    parameters such as ``charset``).

    >>> is_json_media_type("application/json; charset=utf-8"), is_json_media_type("text/plain")
    (True, False)
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class OpenAIIngress:
    """Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``, ``GET /v1/models``,
    ``POST /generate``, ``GET /health``, ``GET /metrics``, ``POST /flush_cache``, ``GET /get_model_info``,
    ``POST /tokenize``, ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``.

    ``registry``: a handle to the app's ``LoRARegistry`` deployment, which every ingress replica follows (without
    one, adapters loaded at run time are known to this replica only).

    ``config``: ``model_path`` and, optionally, ``served_model_name``, ``api_key``, ``max_body_bytes``, the
    :class:`~sgl_ray.protocol.RequestLimits` (``max_prompt_chars``, ``max_message_chars``,
    ``max_sequences_per_request``), ``trust_request_chat_template``, ``tokenizer_threads`` and the engine's
    ``context_length``, ``tokenizer_path``, ``tool_call_parser``, ``reasoning_parser`` and LoRA options.

    Example (what ``build_openai_app`` does)::

        >>> app = serve.deployment(OpenAIIngress).bind(server, {"model_path": path}, registry)  # doctest: +SKIP
    """

    def __init__(self, server: Any, config: dict[str, Any], registry: Any = None) -> None:
        self.server = server
        self.model_path = config["model_path"]
        self.model_id = config.get("served_model_name") or self.model_path
        self.api_key = config.get("api_key")
        self.max_body_bytes = int(config.get("max_body_bytes", 16 * 2**20))
        source = resolve_model(self.model_path)
        self.tokenizer = load_tokenizer(source, config.get("tokenizer_path"))
        self.token_texts = P.TokenTexts(self.tokenizer)
        hf_config = load_hf_config(source)
        mc = ModelConfig(hf_config, torch.float32, config.get("context_length"))
        self.context_length, self.vocab_size = mc.context_length, mc.vocab_size
        self.created = P.now()
        self.role_format = role_format_from_tokenizer(self.tokenizer).to_dict()
        # a template that does not render assistant tool calls sees them as text in the parser's format
        tool_format = P.ToolFormat.for_tokenizer(self.tokenizer, config.get("tool_call_parser"))
        reasoning = config.get("reasoning_parser")
        self.reasoning_parser = get_reasoning_parser(reasoning) if reasoning else None
        limits = P.RequestLimits.for_context(
            self.context_length,
            max_prompt_chars=config.get("max_prompt_chars"),
            max_message_chars=config.get("max_message_chars"),
            max_sequences_per_request=config.get("max_sequences_per_request"),
        )
        self.pre = Preprocessor(
            self.tokenizer,
            limits,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            tool_parser=tool_format.parser,
            reasoning_parser=self.reasoning_parser,
            calls_as_text=tool_format.calls_as_text,
            trust_request_chat_template=bool(config.get("trust_request_chat_template")),
        )
        threads = int(config.get("tokenizer_threads") or DEFAULT_TOKENIZER_THREADS)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sgl-ray-tokenize")
        self.metrics = Metrics()
        self.lora = IngressAdapters(
            self.model_id,
            hf_config,
            int(config.get("max_lora_rank") or 0),
            bool(config.get("enable_lora")),
            registry,
            {name: (path, False) for name, path in parse_lora_paths(config.get("lora_paths")).items()},
            allow_pickle=bool(config.get("lora_allow_pickle")),
        )
        self._lora_start: asyncio.Task | None = None
        try:  # in a Serve replica the constructor runs on its event loop: follow the registry from now on
            self._lora_start = asyncio.get_running_loop().create_task(self.lora.start())
        except RuntimeError:  # no loop: the first request starts it
            pass
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/responses"): self.responses,
            ("GET", "/v1/models"): self.models,
            ("POST", "/generate"): self.generate,
            ("GET", "/health"): self.health,
            ("GET", "/metrics"): self.prometheus,
            ("POST", "/flush_cache"): self.flush_cache,
            ("GET", "/get_model_info"): self.model_info,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/v1/load_lora_adapter"): self.load_lora_adapter,
            ("POST", "/v1/unload_lora_adapter"): self.unload_lora_adapter,
        }

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):  # deployed under a route prefix
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        handler = self.routes.get((method, path))
        try:
            if handler is None:
                if any(p == path for _, p in self.routes):
                    raise HTTPError(
                        405, f"Method {method} is not allowed on {path}.", "invalid_request_error"
                    )
                raise HTTPError(404, f"Unknown route {path}.", "not_found_error")
            if path != "/health":
                self._authorize(request)
                await self.lora.ready()
            response = await handler(request)
        except SglRayError as e:
            response = json_response(P.error_body(e), e.status_code)
        except Exception as e:  # a bug or a dead replica: 500, the server keeps serving
            cause = unwrap(e)
            if isinstance(cause, SglRayError):
                response = json_response(P.error_body(cause), cause.status_code)
            elif isinstance(cause, RecursionError):  # input nested deeper than a parser follows
                response = json_response(P.error_body(P.too_deep()), 400)
            else:
                logger.exception("request failed")
                response = json_response(P.internal_error_body(), 500)
        self.metrics.request_done(path if handler else "other", response.status_code)
        return response

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise HTTPError(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The JSON request body: a 415 unless it is sent as ``application/json``, a 413 above ``max_body_bytes``.
        A refused body is still drained (not kept), so the client reads the error instead of a reset connection."""
        is_json = is_json_media_type(request.headers.get("content-type"))
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if is_json and size <= self.max_body_bytes:
                parts.append(chunk)
        if not is_json:
            raise HTTPError(
                415,
                "Unsupported Content-Type: send the JSON body with 'Content-Type: application/json'.",
                "invalid_request_error",
                "unsupported_media_type",
            )
        if size > self.max_body_bytes:
            raise HTTPError(
                413, f"Request body exceeds {self.max_body_bytes} bytes.", "invalid_request_error"
            )
        return b"".join(parts)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the ingress's thread pool (see :mod:`sgl_ray.deployments.preprocess`)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def _decode(self, kind: P.RequestKind, request: Request) -> Any:
        """The request's body, decoded and checked off the loop (a 16 MB body takes a while to decode)."""
        return await self._off_loop(P.decode_request, kind, await self._body(request))

    # --- generation plumbing -----------------------------------------------------------------------------------
    async def _outputs(
        self, prompts: list[list[int]], params, lp: P.LogprobOptions, lora: str | None = None
    ) -> AsyncIterator:
        """``(choice index, RequestOutput)`` for every prompt × sample (choice index ``prompt_index * n +
        sample``), from one replica call routed on the first prompt. Closing the iterator cancels the stream
        (aborting its requests)."""
        payload = {
            "prompts": prompts,
            "sampling_params": params,
            "return_logprob": lp.return_logprob,
            "top_logprobs_num": lp.top_logprobs_num,
            "logprob_start_len": lp.logprob_start_len,
            "lora_name": lora,
            "lora_sync": self.lora.snapshot(),
        }
        gen = self.server.options(stream=True).generate.remote(payload)
        try:
            async for item in gen:
                yield item
        except SglRayError:
            raise
        except Exception as e:
            raise unwrap(e) from None
        finally:
            gen.cancel()

    async def _run(self, assembler, outputs: AsyncIterator, stream: bool, started: float) -> Response:
        return await assembled_response(assembler, outputs, stream, Latency(started), self._record)

    def _record(self, tracker: Latency) -> None:
        usage = tracker.usage
        self.metrics.tokens(usage[0], usage[1], usage[2])
        self.metrics.latency(tracker.ttft, tracker.itls)

    # --- routes --------------------------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        req = await self._decode("chat", request)
        lora = await self.lora.resolve(req.model)
        ids, params, parsing = await self._off_loop(self.pre.chat, req)
        outputs = await primed(self._outputs([ids], params, P.logprob_options(req), lora), req.stream, params)
        kw = {"model": self.model_id, "token_texts": self.token_texts, "parsing": parsing}
        if req.stream:
            assembler = P.ChatStreamAssembler.from_request(req, include_usage=req.include_usage, **kw)
        else:
            assembler = P.ChatResponseBuilder.from_request(req, **kw)
        return await self._run(assembler, outputs, bool(req.stream), started)

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API, stateless, on the chat path (see :mod:`sgl_ray.protocol.responses_api`)."""
        started = time.perf_counter()
        req = await self._decode("responses", request)
        lora = await self.lora.resolve(req.model)
        with P.responses_errors():  # the chat path's 400s, in the Responses API's field names
            ids, params, parsing = await self._off_loop(lambda: self.pre.chat(req.to_chat()))
            no_logprobs = P.LogprobOptions(False, 0, -1)
            outputs = await primed(self._outputs([ids], params, no_logprobs, lora), req.stream, params)
        draft = P.ResponseDraft(req, self.model_id)
        assembler = (P.ResponseStreamAssembler if req.stream else P.ResponseBuilder)(draft, parsing)
        return await self._run(assembler, outputs, bool(req.stream), started)

    async def completions(self, request: Request) -> Response:
        started = time.perf_counter()
        req = await self._decode("completion", request)
        lora = await self.lora.resolve(req.model)
        prompts, prompt_texts, params = await self._off_loop(self.pre.completion, req)
        outputs = await primed(
            self._outputs(prompts, params, P.logprob_options(req), lora), req.stream, params
        )
        kw = {"model": self.model_id, "token_texts": self.token_texts, "prompt_texts": prompt_texts}
        if req.stream:
            assembler = P.CompletionStreamAssembler.from_request(req, include_usage=req.include_usage, **kw)
        else:
            assembler = P.CompletionResponseBuilder.from_request(req, **kw)
        return await self._run(assembler, outputs, bool(req.stream), started)

    async def generate(self, request: Request) -> Response:
        """SGLang-native: ``{"text" | "input_ids", "sampling_params", "stream", "return_logprob", ...}``; with
        ``separate_reasoning`` each result's reasoning is in ``reasoning_text`` and ``text`` is the answer."""
        started = time.perf_counter()
        req = await self._decode("generate", request)
        await self.lora.check(req.lora_path)
        calls, batch = await self._off_loop(self.pre.generate, req)
        reasoning = self.reasoning_parser if req.separate_reasoning else None
        lp = P.LogprobOptions(req.return_logprob, req.top_logprobs_num, req.logprob_start_len)
        results: list[NativeResult] = []
        streams = []
        for ids_list, params in calls:
            base = len(results)
            results += [NativeResult(req.return_logprob, reasoning) for _ in range(len(ids_list) * params.n)]
            streams.append(
                (base, await primed(self._outputs(ids_list, params, lp, req.lora_path), req.stream, params))
            )
        tracker = Latency(started)
        response = await native_response(streams, results, bool(req.stream), batch, tracker)
        if not req.stream:
            self.metrics.tokens(*tracker.usage)
        return response

    async def models(self, request: Request) -> Response:
        cards: list[P.ModelCard] = [P.ModelCard(id=self.model_id, created=self.created)]
        cards += [
            P.AdapterCard(id=name, created=self.created, parent=self.model_id, root=path)
            for name, (path, _) in self.lora.adapters.items()
        ]
        return json_response(P.encode(P.ModelList(data=cards)))

    async def load_lora_adapter(self, request: Request) -> Response:
        """``{"lora_name", "lora_path", "pinned"}``: checked here; answered once every ingress replica serves it,
        and every LLM replica applies it before its next call."""
        await self.lora.load(decode_lora(LoadLoRAAdapterRequest, await self._body(request)))
        return json_response(b'{"success": true}')

    async def unload_lora_adapter(self, request: Request) -> Response:
        """``{"lora_name"}``: new requests for it fail at once; requests already using it finish."""
        await self.lora.unload(decode_lora(UnloadLoRAAdapterRequest, await self._body(request)))
        return json_response(b'{"success": true}')

    async def model_info(self, request: Request) -> Response:
        """SGLang-native: the served model, its context length and its chat template's role strings (what
        ``sgl_ray.lang.RuntimeEndpoint`` renders roles with)."""
        info = {
            "model_path": self.model_path,
            "served_model_name": self.model_id,
            "is_generation": True,
            "context_length": self.context_length,
            "role_format": self.role_format,
        }
        return json_response(msgspec.json.encode(info))

    async def tokenize(self, request: Request) -> Response:
        """``{"text": str | [str]}`` → ``{"tokens": ids | [ids]}`` with the server's tokenizer (no special tokens
        added beyond what ``/generate`` adds to a text prompt)."""
        req = await self._decode("tokenize", request)
        return json_response(await self._off_loop(self.pre.tokenize, req))

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def prometheus(self, request: Request) -> Response:
        engine = await self.server.stats.remote()
        return PlainTextResponse(self.metrics.render(engine), media_type="text/plain; version=0.0.4")

    async def flush_cache(self, request: Request) -> Response:
        ok = await self.server.flush_cache.remote()
        if not ok:
            return json_response(
                b'{"success": false, "message": "requests are running; try again when idle"}', 409
            )
        return json_response(b'{"success": true}')

    def __del__(self) -> None:
        lora = getattr(self, "lora", None)
        if lora is not None:
            lora.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
