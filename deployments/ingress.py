"""``OpenAIIngress``: the front of the Serve app — OpenAI-compatible HTTP routes plus SGLang's native ones, and a
Python handle API (``chat``, ``completions``, ``responses``, ``generate``) for other deployments and drivers.

It tokenizes once (chat templates included), validates, and streams each prompt from an ``LLMServer`` replica
chosen by the cache-aware router on the prompt's token ids. An app may serve several models (one
:class:`~sgl_ray.deployments.served_model.ServedModel` each); a request's ``model`` picks one. A client that
disconnects cancels its stream, which aborts the request and frees its KV. Every bad request gets an OpenAI-style
``{"error": …}`` with a 4xx — over HTTP as the body, through a handle as :class:`~sgl_ray.protocol.APIError`.

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
from starlette.requests import Request
from starlette.responses import Response

from sgl_ray import protocol as P
from sgl_ray.deployments.metrics import Metrics
from sgl_ray.deployments.responses import (
    AssembledReply,
    HTTPError,
    Latency,
    NativeReply,
    NativeResult,
    Reply,
    json_response,
    primed,
    unwrap,
)
from sgl_ray.deployments.resume import ResumePolicy, Resumer
from sgl_ray.deployments.running import Running, RunningRequests
from sgl_ray.deployments.served_model import ServedModel
from sgl_ray.deployments.server_routes import MODELS_PATH, ServerRoutes
from sgl_ray.errors import InvalidRequestError, ModelNotFoundError, SglRayError
from sgl_ray.sampling.params import SamplingParams

logger = logging.getLogger(__name__)
RESPONSES_PATH = "/v1/responses"

Handler = Callable[[Request], Awaitable[Response]]
ReplyBuilder = Callable[[Any, float], Awaitable[Reply]]
T = TypeVar("T")
DEFAULT_TOKENIZER_THREADS = 2
UNAUTHENTICATED = ("/health", "/health_generate")  # probes (SGLang leaves both open too)


def is_json_media_type(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` header names JSON (``application/json`` or ``application/<x>+json``, with any
    parameters such as ``charset``).

    >>> is_json_media_type("application/json; charset=utf-8"), is_json_media_type("text/plain")
    (True, False)
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class OpenAIIngress(ServerRoutes):
    """Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``, ``GET /v1/models``,
    ``GET /v1/models/{id}``, ``POST /generate``, ``GET /health``, ``GET /health_generate``, ``GET /metrics``,
    ``POST /flush_cache``, ``GET /get_model_info``, ``GET /get_server_info``, ``POST /tokenize``,
    ``POST /detokenize``, ``POST /abort_request``, ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``.

    Handle API (for model composition, or a driver): ``chat``, ``completions``, ``responses`` and ``generate``
    take the HTTP API's request bodies as dicts and return its response bodies as dicts — or, for a body with
    ``"stream": true`` called through ``handle.options(stream=True)``, an async iterator of its chunk dicts. A bad
    request raises :class:`~sgl_ray.protocol.APIError` with the HTTP status and OpenAI error body. Handle calls
    come from inside the cluster and need no API key.

    ``server``: the ``LLMServer`` deployment's handle; ``config``: ``model_path`` and, optionally,
    ``served_model_name``, ``api_key``, ``max_body_bytes``, ``tokenizer_threads``, ``request_resume_timeout_s`` and
    ``max_request_resumes`` (:class:`~sgl_ray.deployments.resume.ResumePolicy`) and the per-model options of
    :class:`~sgl_ray.deployments.served_model.ServedModel`; ``registry``: a handle to the app's ``LoRARegistry``
    deployment, which every ingress replica follows (without one, adapters loaded at run time are known to this
    replica only). Several models: ``server`` and ``registry`` are ``{model id: handle}`` and ``config["models"]``
    is ``{model id: that model's options}`` (the rest of ``config`` applies to all).

    Example (what ``build_openai_app`` does), then a call through the handle::

        >>> app = serve.deployment(OpenAIIngress).bind(server, {"model_path": path}, registry)  # doctest: +SKIP
        >>> handle = serve.run(app)  # doctest: +SKIP
        >>> body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        >>> handle.chat.remote(body).result()["choices"][0]["message"]["content"]  # doctest: +SKIP
    """

    def __init__(self, server: Any, config: dict[str, Any], registry: Any = None) -> None:
        if isinstance(server, dict):
            shared = {k: v for k, v in config.items() if k != "models"}
            registries = registry or {}
            specs = [(server[m], {**shared, **config["models"][m]}, registries.get(m)) for m in server]
        else:
            specs = [(server, config, registry)]
        self.models: dict[str, ServedModel] = {}
        for handle, model_config, model_registry in specs:
            model = ServedModel(handle, model_config, model_registry)
            if model.model_id in self.models:
                raise ValueError(f"two models are served as {model.model_id!r}")
            self.models[model.model_id] = model
        self.default = next(iter(self.models.values()))
        self.api_key = config.get("api_key")
        self.max_body_bytes = int(config.get("max_body_bytes", 16 * 2**20))
        threads = int(config.get("tokenizer_threads") or DEFAULT_TOKENIZER_THREADS)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sgl-ray-tokenize")
        self.metrics = Metrics()
        self.running = RunningRequests()
        self.resumer = Resumer(ResumePolicy.from_config(config))
        self._lora_starts: list[asyncio.Task] = []
        try:  # in a Serve replica the constructor runs on its event loop: follow the registries from now on
            loop = asyncio.get_running_loop()
            self._lora_starts = [loop.create_task(m.lora.start()) for m in self.models.values()]
        except RuntimeError:  # no loop: the first request starts them
            pass
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): self._http("chat", self._chat_reply),
            ("POST", "/v1/completions"): self._http("completion", self._completion_reply),
            ("POST", RESPONSES_PATH): self._http("responses", self._responses_reply),
            ("POST", "/generate"): self._http("generate", self._generate_reply),
            **self.server_routes(),
        }

    # --- dispatch ------------------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):  # deployed under a route prefix
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        handler = self.routes.get((method, path))
        label = path if handler else "other"
        if handler is None and method == "GET" and path.startswith(MODELS_PATH + "/"):
            model_id = path[len(MODELS_PATH) + 1 :]
            handler, label = functools.partial(self.model_card, model_id=model_id), MODELS_PATH + "/{id}"
        try:
            if handler is None:
                if any(p == path for _, p in self.routes):
                    raise HTTPError(
                        405, f"Method {method} is not allowed on {path}.", "invalid_request_error"
                    )
                if path.startswith(
                    RESPONSES_PATH + "/"
                ):  # retrieve / delete / cancel / input_items of a response
                    response_id = path[len(RESPONSES_PATH) + 1 :].split("/", 1)[0]
                    raise HTTPError(
                        404,
                        f"Response with id '{response_id}' not found: this server stores no responses (every "
                        "response says store: false); send the whole conversation as 'input'.",
                        "invalid_request_error",
                    )
                raise HTTPError(404, f"Unknown route {path}.", "not_found_error")
            if path not in UNAUTHENTICATED:
                self._authorize(request)
                await self._ready()
            response = await handler(request)
        except Exception as e:
            err = self._error(e)
            response = json_response(P.error_body(err), err.status_code)
        self.metrics.request_done(label, response.status_code)
        return response

    def _error(self, e: BaseException) -> SglRayError:
        """The error a failed request answers with: the user's error, a 400 for input nested deeper than a parser
        follows, else a logged 500 that does not leak the cause."""
        cause = unwrap(e)
        if isinstance(cause, SglRayError):
            return cause
        if isinstance(cause, RecursionError):
            return P.too_deep()
        logger.exception("request failed", exc_info=e)
        return HTTPError(500, "Internal server error", "internal_error")

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise HTTPError(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    async def _ready(self) -> None:
        """Before this ingress's first request: every model's LoRA registry followed."""
        for model in self.models.values():
            await model.lora.ready()

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
        self._check_size(size)
        return b"".join(parts)

    def _check_size(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise HTTPError(
                413, f"Request body exceeds {self.max_body_bytes} bytes.", "invalid_request_error"
            )

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the ingress's thread pool (see :mod:`sgl_ray.deployments.preprocess`)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def _decode(self, kind: P.RequestKind, request: Request) -> Any:
        """The request's body, decoded and checked off the loop (a 16 MB body takes a while to decode)."""
        return await self._off_loop(P.decode_request, kind, await self._body(request))

    def _http(self, kind: P.RequestKind, build: ReplyBuilder) -> Handler:
        async def handler(request: Request) -> Response:
            started = time.perf_counter()
            reply = await build(await self._decode(kind, request), started)
            return await reply.http()

        return handler

    # --- models --------------------------------------------------------------------------------------------------
    def _model(self, name: str | None) -> ServedModel:
        """The base model ``name`` names (the app's first model when None)."""
        if name is None:
            return self.default
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist.", param="model", code="model_not_found"
            )
        return model

    async def _select(self, name: str | None) -> tuple[ServedModel, str | None]:
        """The model and LoRA adapter an OpenAI ``model`` names: a model id, ``model:adapter`` or an adapter."""
        if name is None or name in self.models:
            return self._model(name), None
        base = name.rpartition(":")[0]
        if base in self.models:
            return self.models[base], await self.models[base].resolve(name)
        for model in self.models.values():
            if model.owns(name) or (model.lora.enabled and await model.lora.known(name)):
                return model, await model.resolve(name)
        raise ModelNotFoundError(f"The model '{name}' does not exist.", param="model", code="model_not_found")

    # --- generation ----------------------------------------------------------------------------------------------
    async def _outputs(
        self,
        model: ServedModel,
        running: Running,
        prompts: list[list[int]],
        params: SamplingParams,
        lp: P.LogprobOptions,
        lora: str | None = None,
        priority: int | None = None,
        grammar_param: str | None = None,
    ) -> AsyncIterator:
        """``(choice index, RequestOutput)`` for every prompt × sample (choice index ``prompt_index * n +
        sample``), from one replica call routed on the first prompt (resumed on another replica if that one is
        lost: :mod:`sgl_ray.deployments.resume`); ``running`` can abort them. Closing the iterator cancels the
        stream (aborting its requests). A grammar the engine rejects is a 400 naming ``grammar_param``, the
        request field it came from."""
        payload = {
            "prompts": prompts,
            "sampling_params": params,
            "return_logprob": lp.return_logprob,
            "top_logprobs_num": lp.top_logprobs_num,
            "logprob_start_len": lp.logprob_start_len,
            "lora_name": lora,
            "lora_sync": model.lora.snapshot(),
            "priority": priority or 0,
        }
        items = self.resumer.stream(model.server, payload, running, prompts, params.n)
        try:
            async for item in items:
                yield item
        except Exception as e:
            err = P.grammar_error_for(unwrap(e), grammar_param)
            if err is e:
                raise
            raise err from None
        finally:
            await items.aclose()

    async def _tracked(self, rid: str | None, build: Callable[[Running], Awaitable[Reply]]) -> Reply:
        """``build(running)`` for a request tracked under ``rid`` until its reply closes."""
        running = self.running.start(rid)
        try:
            reply = await build(running)
        except BaseException:
            self.running.finish(running)
            raise
        reply.on_close(functools.partial(self.running.finish, running))
        return reply

    def _record(self, tracker: Latency) -> None:
        usage = tracker.usage
        self.metrics.tokens(usage[0], usage[1], usage[2])
        self.metrics.latency(tracker.ttft, tracker.itls)

    async def _chat_reply(self, req: P.ChatCompletionRequest, started: float) -> Reply:
        model, lora = await self._select(req.model)
        fetched = await model.pre.fetch_images(req)  # http(s) images, on this loop
        ids, params, parsing = await self._off_loop(model.pre.chat, req, fetched)

        async def build(running: Running) -> Reply:
            lp = P.logprob_options(req)
            outs = self._outputs(model, running, [ids], params, lp, lora, req.priority, req.grammar_param)
            outputs = await primed(outs, req.stream, params)
            kw = {"model": model.model_id, "token_texts": model.token_texts, "parsing": parsing}
            if req.stream:
                assembler = P.ChatStreamAssembler.from_request(req, **kw)
            else:
                assembler = P.ChatResponseBuilder.from_request(req, **kw)
            return AssembledReply(assembler, outputs, bool(req.stream), Latency(started), self._record)

        return await self._tracked(req.rid, build)

    async def _responses_reply(self, req: P.ResponsesRequest, started: float) -> Reply:
        """OpenAI's Responses API, stateless, on the chat path (see :mod:`sgl_ray.protocol.responses_api`)."""
        model, lora = await self._select(req.model)

        async def build(running: Running) -> Reply:
            with P.responses_errors():  # the chat path's 400s, in the Responses API's field names
                ids, params, parsing = await self._off_loop(lambda: model.pre.chat(req.to_chat()))
                no_logprobs = P.LogprobOptions(False, 0, -1)
                outs = self._outputs(
                    model, running, [ids], params, no_logprobs, lora, None, req.grammar_param
                )
                outputs = await primed(outs, req.stream, params)
            draft = P.ResponseDraft(req, model.model_id)
            assembler = (P.ResponseStreamAssembler if req.stream else P.ResponseBuilder)(draft, parsing)
            return AssembledReply(assembler, outputs, bool(req.stream), Latency(started), self._record)

        return await self._tracked(None, build)

    async def _completion_reply(self, req: P.CompletionRequest, started: float) -> Reply:
        model, lora = await self._select(req.model)
        prompts, prompt_texts, params = await self._off_loop(model.pre.completion, req)

        async def build(running: Running) -> Reply:
            lp = P.logprob_options(req)
            outs = self._outputs(model, running, prompts, params, lp, lora, req.priority, req.grammar_param)
            outputs = await primed(outs, req.stream, params)
            kw: dict[str, Any] = {
                "model": model.model_id,
                "token_texts": model.token_texts,
                "prompt_texts": prompt_texts,
                "prompts": prompts if req.prompt_logprobs is not None else None,
            }
            if req.stream:
                assembler = P.CompletionStreamAssembler.from_request(req, **kw)
            else:
                assembler = P.CompletionResponseBuilder.from_request(req, **kw)
            return AssembledReply(assembler, outputs, bool(req.stream), Latency(started), self._record)

        return await self._tracked(req.rid, build)

    async def _generate_reply(self, req: P.GenerateRequest, started: float) -> Reply:
        """SGLang-native: ``{"text" | "input_ids", "sampling_params", "stream", "return_logprob", ...}``; with
        ``separate_reasoning`` each result's reasoning is in ``reasoning_text`` and ``text`` is the answer."""
        model = self._model(req.model)
        await model.lora.check(req.lora_path)
        fetched = await model.pre.fetch_images(req)
        with P.sampling_params_errors():  # the checks against the vocabulary, worded as check()'s
            calls, batch = await self._off_loop(model.pre.generate, req, fetched)
        reasoning = model.reasoning_parser if req.separate_reasoning else None
        lp = P.LogprobOptions(req.return_logprob, req.top_logprobs_num, req.logprob_start_len)
        total = sum(len(ids) * params.n for ids, params in calls)

        def result_rid(i: int) -> str | None:
            return req.rid if req.rid is None or total == 1 else f"{req.rid}-{i}"

        async def build(running: Running) -> Reply:
            results: list[NativeResult] = []
            streams = []
            for ids_list, params in calls:
                base = len(results)
                k = len(ids_list) * params.n
                results += [
                    NativeResult(req.return_logprob, reasoning, result_rid(base + i)) for i in range(k)
                ]
                outs = self._outputs(model, running, ids_list, params, lp, req.lora_path, req.priority)
                streams.append((base, await primed(outs, req.stream, params)))
            return NativeReply(streams, results, bool(req.stream), batch, Latency(started), self._record)

        return await self._tracked(req.rid, build)

    # --- Python handle API ---------------------------------------------------------------------------------------
    async def chat(self, body: dict[str, Any]) -> Any:
        """``POST /v1/chat/completions`` for a handle caller: the response dict, or (``"stream": true``, called
        with ``handle.options(stream=True)``) an async iterator of ``chat.completion.chunk`` dicts. Raises
        :class:`~sgl_ray.protocol.APIError` where HTTP would answer with an error.

        Example (from a driver or another deployment)::

            >>> handle = serve.get_app_handle("sgl_ray")  # doctest: +SKIP
            >>> body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
            >>> handle.chat.remote(body).result()["choices"][0]["message"]["content"]  # doctest: +SKIP
            >>> for chunk in handle.options(stream=True).chat.remote({**body, "stream": True}):  # doctest: +SKIP
            ...     print(chunk["choices"][0]["delta"].get("content", "") if chunk["choices"] else "")
        """
        return await self._handle_call("/v1/chat/completions", "chat", self._chat_reply, body)

    async def completions(self, body: dict[str, Any]) -> Any:
        """``POST /v1/completions`` for a handle caller (see :meth:`chat`)."""
        return await self._handle_call("/v1/completions", "completion", self._completion_reply, body)

    async def responses(self, body: dict[str, Any]) -> Any:
        """``POST /v1/responses`` for a handle caller (see :meth:`chat`); streamed, its events as dicts."""
        return await self._handle_call("/v1/responses", "responses", self._responses_reply, body)

    async def generate(self, body: dict[str, Any]) -> Any:
        """SGLang's ``POST /generate`` for a handle caller (see :meth:`chat`): a result dict (a list for a batch),
        or streamed, its chunk dicts."""
        return await self._handle_call("/generate", "generate", self._generate_reply, body)

    async def _handle_call(self, path: str, kind: P.RequestKind, build: ReplyBuilder, body: Any) -> Any:
        """One handle call through the HTTP route's own decoding, checks and reply (so both give the same
        answers and errors)."""
        started = time.perf_counter()
        try:
            await self._ready()
            raw = await self._off_loop(_json_body, body)
            self._check_size(len(raw))
            reply = await build(await self._off_loop(P.decode_request, kind, raw), started)
            result = await reply.python()
        except Exception as e:
            raise self._handle_error(path, e) from None
        if not reply.stream:
            self.metrics.request_done(path, 200)
            return result
        return self._handle_stream(path, result)

    async def _handle_stream(self, path: str, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:
            raise self._handle_error(path, e) from None
        finally:
            await chunks.aclose()
        self.metrics.request_done(path, 200)

    def _handle_error(self, path: str, e: BaseException) -> P.APIError:
        err = self._error(e)
        self.metrics.request_done(path, err.status_code)
        return P.APIError.from_error(err)

    def __del__(self) -> None:
        for model in getattr(self, "models", {}).values():
            model.lora.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _json_body(body: Any) -> bytes:
    """A handle call's body as the JSON bytes an HTTP client would send (a dict, or JSON text)."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    try:
        return msgspec.json.encode(body)
    except RecursionError:
        raise P.too_deep() from None
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidRequestError(f"The request body must be a JSON-serializable dict ({e}).") from None
