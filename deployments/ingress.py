"""``OpenAIIngress``: the HTTP front of the Serve app — OpenAI-compatible routes plus SGLang's native ones.

It tokenizes once (chat templates included), validates, and streams each prompt from an ``LLMServer`` replica
chosen by the cache-aware router on the prompt's token ids. A client that disconnects cancels its stream, which
aborts the request and frees its KV. Every bad request gets an OpenAI-style ``{"error": …}`` with a 4xx.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

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
from sgl_ray.errors import InvalidRequestError, SglRayError
from sgl_ray.lang.template import role_format_from_tokenizer
from sgl_ray.lora.adapter import parse_lora_paths
from sgl_ray.model_loader import load_hf_config, load_tokenizer, resolve_model
from sgl_ray.reasoning import get_reasoning_parser
from sgl_ray.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


class OpenAIIngress:
    """Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``, ``GET /v1/models``,
    ``POST /generate``, ``GET /health``, ``GET /metrics``, ``POST /flush_cache``, ``GET /get_model_info``,
    ``POST /tokenize``, ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``.

    ``registry``: a handle to the app's ``LoRARegistry`` deployment, which every ingress replica follows (without
    one, adapters loaded at run time are known to this replica only).

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
        self.tool_format = P.ToolFormat.for_tokenizer(self.tokenizer, config.get("tool_call_parser"))
        reasoning = config.get("reasoning_parser")
        self.reasoning_parser = get_reasoning_parser(reasoning) if reasoning else None
        self.metrics = Metrics()
        self.lora = IngressAdapters(
            self.model_id,
            hf_config,
            int(config.get("max_lora_rank") or 0),
            bool(config.get("enable_lora")),
            registry,
            {name: (path, False) for name, path in parse_lora_paths(config.get("lora_paths")).items()},
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
        """The request body, refused with a 413 above ``max_body_bytes``. An oversized body is still drained (not
        kept), so the client reads the error instead of a reset connection."""
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= self.max_body_bytes:
                parts.append(chunk)
        if size > self.max_body_bytes:
            raise HTTPError(
                413, f"Request body exceeds {self.max_body_bytes} bytes.", "invalid_request_error"
            )
        return b"".join(parts)

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
    def _chat_inputs(self, req: P.ChatCompletionRequest) -> tuple[list[int], SamplingParams, P.OutputParsing]:
        """A chat request's prompt ids, sampling parameters and output parsing (tools, reasoning)."""
        parsing = P.chat_output_parsing(req, self.tool_format.parser, self.reasoning_parser)
        ids = P.render_chat(
            self.tokenizer,
            req.messages,
            tools=req.tools if parsing.tools and parsing.tools.parser else None,
            template_kwargs=req.chat_template_kwargs,
            calls_as_text=self.tool_format.calls_as_text,
        )
        P.check_prompt_length(len(ids), self.context_length)
        params = P.to_sampling_params(req, self.vocab_size, self.context_length, len(ids))
        return ids, P.output_params(req, params, parsing), parsing

    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        req = P.decode_request("chat", await self._body(request))
        req.check()
        lora = await self.lora.resolve(req.model)
        ids, params, parsing = self._chat_inputs(req)
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
        req = P.decode_request("responses", await self._body(request))
        lora = await self.lora.resolve(req.model)
        with P.responses_errors():  # the chat path's 400s, in the Responses API's field names
            ids, params, parsing = self._chat_inputs(req.to_chat())
            no_logprobs = P.LogprobOptions(False, 0, -1)
            outputs = await primed(self._outputs([ids], params, no_logprobs, lora), req.stream, params)
        draft = P.ResponseDraft(req, self.model_id)
        assembler = (P.ResponseStreamAssembler if req.stream else P.ResponseBuilder)(draft, parsing)
        return await self._run(assembler, outputs, bool(req.stream), started)

    async def completions(self, request: Request) -> Response:
        started = time.perf_counter()
        req = P.decode_request("completion", await self._body(request))
        req.check()
        lora = await self.lora.resolve(req.model)
        texts, token_lists = req.prompt_batch()
        if token_lists is None:
            token_lists = [self.tokenizer.encode(t) for t in texts or []]
            prompt_texts = None
        else:
            for ids in token_lists:
                P.check_prompt_ids(ids, self.vocab_size)
            prompt_texts = [self.tokenizer.decode(ids) for ids in token_lists] if req.echo else None
        for ids in token_lists:
            P.check_prompt_length(len(ids), self.context_length, param="prompt")
        longest = max(len(ids) for ids in token_lists)
        params = P.to_sampling_params(req, self.vocab_size, self.context_length, longest)
        outputs = await primed(
            self._outputs(token_lists, params, P.logprob_options(req), lora), req.stream, params
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
        req = P.decode_request("generate", await self._body(request))
        req.check()
        await self.lora.check(req.lora_path)
        texts = [req.text] if isinstance(req.text, str) else req.text
        ids_in = req.input_ids
        batch = isinstance(req.text, list) or (bool(ids_in) and isinstance(ids_in[0], list))
        prompts = (
            [self.tokenizer.encode(t) for t in texts]
            if texts is not None
            else (
                [list(x) for x in ids_in] if batch else [list(ids_in)]  # type: ignore[arg-type, list-item]
            )
        )
        for ids in prompts:
            P.check_prompt_ids(ids, self.vocab_size, param="input_ids")
            P.check_prompt_length(len(ids), self.context_length, param="text")
        sp = req.sampling_params
        if isinstance(sp, list) and len(sp) != len(prompts):
            raise InvalidRequestError(
                "sampling_params list must match the number of prompts", param="sampling_params"
            )
        if req.separate_reasoning and self.reasoning_parser is None:
            raise InvalidRequestError(
                "'separate_reasoning' needs a server started with a reasoning parser (--reasoning-parser).",
                param="separate_reasoning",
            )
        reasoning = self.reasoning_parser if req.separate_reasoning else None
        lp = P.LogprobOptions(req.return_logprob, req.top_logprobs_num, req.logprob_start_len)
        # One replica call per distinct parameter set: all prompts together when they share it.
        if isinstance(sp, list):
            calls = [([ids], p.normalized()) for ids, p in zip(prompts, sp, strict=True)]
        else:
            calls = [(prompts, (sp or SamplingParams()).normalized())]
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
        req = P.decode_request("tokenize", await self._body(request))
        texts = [req.text] if isinstance(req.text, str) else req.text
        tokens = [self.tokenizer.encode(t) for t in texts]
        return json_response(
            msgspec.json.encode({"tokens": tokens[0] if isinstance(req.text, str) else tokens})
        )

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
