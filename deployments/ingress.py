"""``OpenAIIngress``: the HTTP front of the Serve app — OpenAI-compatible routes plus SGLang's native ones.

It tokenizes once (chat templates included), validates, and streams each prompt from an ``LLMServer`` replica
chosen by the cache-aware router on the prompt's token ids. A client that disconnects cancels its stream, which
aborts the request and frees its KV. Every bad request gets an OpenAI-style ``{"error": …}`` with a 4xx.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import torch
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from sgl_ray import protocol as P
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.deployments.lora import AdapterRegistry, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from sgl_ray.deployments.lora import decode as decode_lora
from sgl_ray.deployments.metrics import Metrics
from sgl_ray.entrypoints.requests import ResultBuilder
from sgl_ray.errors import InvalidRequestError, SglRayError
from sgl_ray.lang.template import role_format_from_tokenizer
from sgl_ray.lora.adapter import parse_lora_paths
from sgl_ray.model_loader import load_hf_config, load_tokenizer, resolve_model
from sgl_ray.sampling.params import SamplingParams
from sgl_ray.scheduler.output import RequestOutput

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
JSON = "application/json"


class _HTTPError(SglRayError):
    def __init__(self, status: int, message: str, error_type: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status_code, self.error_type = status, error_type


def _json(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type=JSON)


def _unwrap(e: BaseException) -> BaseException:
    """Serve re-raises a replica's exception as a RayTaskError; return the user's exception."""
    return getattr(e, "cause", None) or e


class OpenAIIngress:
    """Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``POST /generate``,
    ``GET /health``, ``GET /metrics``, ``POST /flush_cache``, ``GET /get_model_info``, ``POST /tokenize``,
    ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``.

    Example (what ``build_openai_app`` does)::

        >>> app = serve.deployment(OpenAIIngress).bind(server, {"model_path": path})  # doctest: +SKIP
    """

    def __init__(self, server: Any, config: dict[str, Any]) -> None:
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
        self.metrics = Metrics()
        self.lora = AdapterRegistry(
            self.model_id,
            hf_config,
            int(config.get("max_lora_rank") or 0),
            bool(config.get("enable_lora")),
            {name: (path, False) for name, path in parse_lora_paths(config.get("lora_paths")).items()},
        )
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions,
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
                    raise _HTTPError(
                        405, f"Method {method} is not allowed on {path}.", "invalid_request_error"
                    )
                raise _HTTPError(404, f"Unknown route {path}.", "not_found_error")
            if path != "/health":
                self._authorize(request)
            response = await handler(request)
        except SglRayError as e:
            response = _json(P.error_body(e), e.status_code)
        except Exception as e:  # a bug or a dead replica: 500, the server keeps serving
            cause = _unwrap(e)
            if isinstance(cause, SglRayError):
                response = _json(P.error_body(cause), cause.status_code)
            else:
                logger.exception("request failed")
                response = _json(P.internal_error_body(), 500)
        self.metrics.request_done(path if handler else "other", response.status_code)
        return response

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise _HTTPError(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with a 413 above ``max_body_bytes``. An oversized body is still drained (not
        kept), so the client reads the error instead of a reset connection."""
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= self.max_body_bytes:
                parts.append(chunk)
        if size > self.max_body_bytes:
            raise _HTTPError(
                413, f"Request body exceeds {self.max_body_bytes} bytes.", "invalid_request_error"
            )
        return b"".join(parts)

    def _check_model(self, model: str | None) -> str | None:
        """The LoRA adapter ``model`` selects (``base``, ``base:adapter`` or ``adapter``); None for the base."""
        return self.lora.resolve(model)

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
            raise _unwrap(e) from None
        finally:
            gen.cancel()

    async def _run(self, assembler, outputs: AsyncIterator, stream: bool, started: float) -> Response:
        tracker = _Latency(started)
        if not stream:
            async for index, out in outputs:
                tracker.saw(out)
                assembler.add(index, out)
            self._record(assembler, tracker)
            return _json(P.encode(assembler.build()))

        async def events() -> AsyncIterator[bytes]:
            try:
                for chunk in getattr(assembler, "start", list)():
                    yield P.sse_event(chunk)
                async for index, out in outputs:
                    tracker.saw(out)
                    for chunk in assembler.add(index, out):
                        yield P.sse_event(chunk)
                for chunk in assembler.finish():
                    yield P.sse_event(chunk)
                yield P.SSE_DONE
                self._record(assembler, tracker)
            except SglRayError as e:
                yield P.sse_error(e)
                yield P.SSE_DONE
            finally:
                await outputs.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    def _record(self, assembler, tracker: _Latency) -> None:
        usage = tracker.usage
        self.metrics.tokens(usage[0], usage[1], usage[2])
        self.metrics.latency(tracker.ttft, tracker.itls)

    # --- routes --------------------------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        req = P.decode_request("chat", await self._body(request))
        req.check()
        lora = self._check_model(req.model)
        ids = P.render_chat(
            self.tokenizer, req.messages, tools=req.tools, template_kwargs=req.chat_template_kwargs
        )
        P.check_prompt_length(len(ids), self.context_length)
        params = P.to_sampling_params(req, self.vocab_size, self.context_length, len(ids))
        outputs = await _primed(
            self._outputs([ids], params, P.logprob_options(req), lora), req.stream, params
        )
        kw = {"model": self.model_id, "token_texts": self.token_texts}
        if req.stream:
            assembler = P.ChatStreamAssembler.from_request(req, include_usage=req.include_usage, **kw)
        else:
            assembler = P.ChatResponseBuilder.from_request(req, **kw)
        return await self._run(assembler, outputs, bool(req.stream), started)

    async def completions(self, request: Request) -> Response:
        started = time.perf_counter()
        req = P.decode_request("completion", await self._body(request))
        req.check()
        lora = self._check_model(req.model)
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
        outputs = await _primed(
            self._outputs(token_lists, params, P.logprob_options(req), lora), req.stream, params
        )
        kw = {"model": self.model_id, "token_texts": self.token_texts, "prompt_texts": prompt_texts}
        if req.stream:
            assembler = P.CompletionStreamAssembler.from_request(req, include_usage=req.include_usage, **kw)
        else:
            assembler = P.CompletionResponseBuilder.from_request(req, **kw)
        return await self._run(assembler, outputs, bool(req.stream), started)

    async def generate(self, request: Request) -> Response:
        """SGLang-native: ``{"text" | "input_ids", "sampling_params", "stream", "return_logprob", ...}``."""
        started = time.perf_counter()
        req = P.decode_request("generate", await self._body(request))
        req.check()
        self.lora.check(req.lora_path)
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
        lp = P.LogprobOptions(req.return_logprob, req.top_logprobs_num, req.logprob_start_len)
        # One replica call per distinct parameter set: all prompts together when they share it.
        if isinstance(sp, list):
            calls = [([ids], p.normalized()) for ids, p in zip(prompts, sp, strict=True)]
        else:
            calls = [(prompts, (sp or SamplingParams()).normalized())]
        results: list[_NativeResult] = []
        streams = []
        for ids_list, params in calls:
            base = len(results)
            results += [_NativeResult(req.return_logprob) for _ in range(len(ids_list) * params.n)]
            streams.append(
                (base, await _primed(self._outputs(ids_list, params, lp, req.lora_path), req.stream, params))
            )
        tracker = _Latency(started)
        if not req.stream:
            for base, outs in streams:
                async for index, out in outs:
                    tracker.saw(out)
                    results[base + index].add(out)
            self.metrics.tokens(*tracker.usage)
            body = [r.result() for r in results]
            return _json(msgspec.json.encode(body if batch or len(body) > 1 else body[0]))

        async def events() -> AsyncIterator[bytes]:
            for base, outs in streams:
                try:
                    async for index, out in outs:
                        yield P.sse_event(results[base + index].add(out))
                except SglRayError as e:
                    yield P.sse_error(e)
                    break
                finally:
                    await outs.aclose()
            yield P.SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(self, request: Request) -> Response:
        cards: list[P.ModelCard] = [P.ModelCard(id=self.model_id, created=self.created)]
        cards += [
            P.AdapterCard(id=name, created=self.created, parent=self.model_id, root=path)
            for name, (path, _) in self.lora.adapters.items()
        ]
        return _json(P.encode(P.ModelList(data=cards)))

    async def load_lora_adapter(self, request: Request) -> Response:
        """``{"lora_name", "lora_path", "pinned"}``: checked here; every replica applies it before its next call."""
        self.lora.load(decode_lora(LoadLoRAAdapterRequest, await self._body(request)))
        return _json(b'{"success": true}')

    async def unload_lora_adapter(self, request: Request) -> Response:
        """``{"lora_name"}``: new requests for it fail at once; requests already using it finish."""
        self.lora.unload(decode_lora(UnloadLoRAAdapterRequest, await self._body(request)))
        return _json(b'{"success": true}')

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
        return _json(msgspec.json.encode(info))

    async def tokenize(self, request: Request) -> Response:
        """``{"text": str | [str]}`` → ``{"tokens": ids | [ids]}`` with the server's tokenizer (no special tokens
        added beyond what ``/generate`` adds to a text prompt)."""
        req = P.decode_request("tokenize", await self._body(request))
        texts = [req.text] if isinstance(req.text, str) else req.text
        tokens = [self.tokenizer.encode(t) for t in texts]
        return _json(msgspec.json.encode({"tokens": tokens[0] if isinstance(req.text, str) else tokens}))

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def prometheus(self, request: Request) -> Response:
        engine = await self.server.stats.remote()
        return PlainTextResponse(self.metrics.render(engine), media_type="text/plain; version=0.0.4")

    async def flush_cache(self, request: Request) -> Response:
        ok = await self.server.flush_cache.remote()
        if not ok:
            return _json(b'{"success": false, "message": "requests are running; try again when idle"}', 409)
        return _json(b'{"success": true}')


async def _primed(outputs: AsyncIterator, stream: bool | None, params: SamplingParams) -> AsyncIterator:
    """For a streamed request with a grammar, wait for its first output before the response starts, so that a
    grammar the engine rejects (it is compiled asynchronously) is still an HTTP 400, not an error event."""
    if not stream or params.grammar is None:
        return outputs
    try:
        first = await anext(outputs)
    except BaseException:
        await outputs.aclose()
        raise

    async def chained() -> AsyncIterator:
        try:
            yield first
            async for item in outputs:
                yield item
        finally:
            await outputs.aclose()

    return chained()


class _NativeResult:
    """``/generate`` results in the engine's own shape (cumulative in the end, per-chunk deltas when streamed)."""

    def __init__(self, return_logprob: bool) -> None:
        self.builder: ResultBuilder | None = None
        self.return_logprob = return_logprob

    def add(self, out: RequestOutput) -> dict[str, Any]:
        if self.builder is None:
            self.builder = ResultBuilder(out.rid, self.return_logprob)
        self.builder.add(out)
        return self.builder.chunk(out)

    def result(self) -> dict[str, Any]:
        assert self.builder is not None
        return self.builder.result()


class _Latency:
    """TTFT, inter-token gaps and token counts of one HTTP request."""

    def __init__(self, started: float) -> None:
        self.started = self.last = started
        self.ttft: float | None = None
        self.itls: list[float] = []
        self._prompt: dict[str, tuple[int, int]] = {}
        self._generated = 0

    def saw(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.token_ids:
            if self.ttft is None:
                self.ttft = now - self.started
            else:
                self.itls.append(now - self.last)
            self.last = now
            self._generated += len(out.token_ids)
        self._prompt[out.rid] = (out.prompt_tokens, out.cached_tokens)

    @property
    def usage(self) -> tuple[int, int, int]:
        return (
            sum(p for p, _ in self._prompt.values()),
            sum(c for _, c in self._prompt.values()),
            self._generated,
        )
