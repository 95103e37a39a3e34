"""The ingress's routes that are not generation: models, server and model info, health, tokenizing, aborting,
cache, metrics and LoRA adapters (SGLang's and vLLM's names and shapes).

:class:`ServerRoutes` is a mixin of :class:`~sgl_ray.deployments.ingress.OpenAIIngress`: it reads the ingress's
models, body decoding, thread pool, metrics and running requests, and contributes :meth:`server_routes`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

import sgl_ray
from sgl_ray import protocol as P
from sgl_ray.deployments.lora import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from sgl_ray.deployments.lora import decode as decode_lora
from sgl_ray.deployments.responses import HTTPError, json_response, unwrap
from sgl_ray.errors import InvalidRequestError, ModelNotFoundError
from sgl_ray.sampling.params import SamplingParams

if TYPE_CHECKING:
    from sgl_ray.deployments.ingress import OpenAIIngress
    from sgl_ray.deployments.served_model import ServedModel

MODELS_PATH = "/v1/models"
HEALTH_GENERATE_TIMEOUT_S = 30.0
HEALTH_GENERATE_PROMPT = "Hi"


class ServerRoutes:
    """Informational and control routes; see the module docstring."""

    def server_routes(self: OpenAIIngress) -> dict[tuple[str, str], Any]:
        return {
            ("GET", MODELS_PATH): self.list_models,
            ("GET", "/health"): self.health,
            ("GET", "/health_generate"): self.health_generate,
            ("GET", "/metrics"): self.prometheus,
            ("POST", "/flush_cache"): self.flush_cache,
            ("GET", "/get_model_info"): self.model_info,
            ("GET", "/get_server_info"): self.server_info,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
            ("POST", "/abort_request"): self.abort_request,
            ("POST", "/v1/load_lora_adapter"): self.load_lora_adapter,
            ("POST", "/v1/unload_lora_adapter"): self.unload_lora_adapter,
        }

    # --- models and info -----------------------------------------------------------------------------------------
    async def list_models(self: OpenAIIngress, request: Request) -> Response:
        """Every model with its ``max_model_len``, then each one's LoRA adapters."""
        cards = [card for model in self.models.values() for card in model.cards()]
        return json_response(P.encode(P.ModelList(data=cards)))

    async def model_card(self: OpenAIIngress, request: Request, model_id: str) -> Response:
        """``GET /v1/models/{id}``: one model's (or adapter's) card, a 404 for an unknown id."""
        for model in self.models.values():
            for card in model.cards():
                if card.id == model_id:
                    return json_response(P.encode(card))
        raise ModelNotFoundError(
            f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
        )

    async def model_info(self: OpenAIIngress, request: Request) -> Response:
        """SGLang-native: the served model (``?model=`` picks one of several), its context length and its chat
        template's role strings (what ``sgl_ray.lang.RuntimeEndpoint`` renders roles with)."""
        model = self._model(request.query_params.get("model"))
        return json_response(msgspec.json.encode(model.info()))

    async def server_info(self: OpenAIIngress, request: Request) -> Response:
        """SGLang-native: the first model's engine arguments at the top level (SGLang's server arguments), its
        replica's scheduler counters in ``internal_states``, the version, the same for every model in ``models``,
        and in ``ingress`` this ingress replica's counts of requests resumed after their LLM replica was lost and
        of those that could not be (:mod:`sgl_ray.deployments.resume`). Secrets (the API key) are never
        included."""
        models = list(self.models.values())
        infos = await asyncio.gather(*(m.server.server_info.remote() for m in models))
        entries = [_server_entry(m, info) for m, info in zip(models, infos, strict=True)]
        resumed = {
            "resumed_requests": self.resumer.num_resumed,
            "unresumable_requests": self.resumer.num_failed,
        }
        body = {**entries[0], "version": sgl_ray.__version__, "models": entries, "ingress": resumed}
        return json_response(msgspec.json.encode(body))

    # --- health --------------------------------------------------------------------------------------------------
    async def health(self: OpenAIIngress, request: Request) -> Response:
        return Response(status_code=200)

    async def health_generate(self: OpenAIIngress, request: Request) -> Response:
        """SGLang-native: 200 once every model generated one token through its LLM replicas, else a 503 naming
        the model (within :data:`HEALTH_GENERATE_TIMEOUT_S`)."""
        params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True).normalized()
        no_logprobs = P.LogprobOptions(False, 0, -1)
        for model in self.models.values():
            ids = model.tokenizer.encode(HEALTH_GENERATE_PROMPT) or [0]
            running = self.running.start(None)
            outputs = self._outputs(model, running, [ids], params, no_logprobs)
            generated = 0
            try:
                async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
                    async for _, out in outputs:
                        generated += len(out.token_ids)
            except TimeoutError:
                raise HTTPError(
                    503,
                    f"Model '{model.model_id}' generated no token within {HEALTH_GENERATE_TIMEOUT_S:g} s.",
                    "server_error",
                ) from None
            except Exception as e:
                raise HTTPError(
                    503, f"Model '{model.model_id}' could not generate: {unwrap(e)}", "server_error"
                ) from None
            finally:
                await outputs.aclose()
                self.running.finish(running)
            if generated != 1:
                raise HTTPError(
                    503, f"Model '{model.model_id}' generated {generated} tokens, not 1.", "server_error"
                )
        return Response(status_code=200)

    async def prometheus(self: OpenAIIngress, request: Request) -> Response:
        models = list(self.models.values())
        stats = await asyncio.gather(*(m.server.stats.remote() for m in models))
        labelled = len(models) > 1
        engines = [(m.model_id if labelled else None, s) for m, s in zip(models, stats, strict=True)]
        return PlainTextResponse(self.metrics.render(engines), media_type="text/plain; version=0.0.4")

    # --- tokens --------------------------------------------------------------------------------------------------
    async def tokenize(self: OpenAIIngress, request: Request) -> Response:
        """``{"text": str | [str]}`` → ``{"tokens": ids | [ids]}`` with the server's tokenizer (no special tokens
        added beyond what ``/generate`` adds to a text prompt)."""
        req = await self._decode("tokenize", request)
        return json_response(await self._off_loop(self._model(req.model).pre.tokenize, req))

    async def detokenize(self: OpenAIIngress, request: Request) -> Response:
        """SGLang-native: ``{"tokens": ids | [ids], "skip_special_tokens": true}`` → ``{"text": str | [str]}``."""
        req: P.DetokenizeRequest = await self._decode("detokenize", request)
        model = self._model(req.model)
        lists: list[list[int]] = req.tokens if req.batch else [req.tokens]  # type: ignore[assignment, list-item]
        for ids in lists:
            P.check_prompt_ids(ids, model.vocab_size, param="tokens")

        def decode() -> bytes:
            texts = [
                model.tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens) for ids in lists
            ]
            return msgspec.json.encode({"text": texts if req.batch else texts[0]})

        return json_response(await self._off_loop(decode))

    # --- control -------------------------------------------------------------------------------------------------
    async def abort_request(self: OpenAIIngress, request: Request) -> Response:
        """SGLang-native: ``{"rid": …}`` aborts the running request the client named so (``rid`` of ``/generate``,
        chat or completions), ``{"abort_all": true}`` every request of this ingress replica. The aborted request
        ends with ``finish_reason`` ``abort``. Answers ``{"aborted": count}`` (0 when no such request runs)."""
        req: P.AbortRequest = await self._decode("abort", request)
        aborted = self.running.abort_all() if req.abort_all else int(self.running.abort(req.rid or ""))
        return json_response(msgspec.json.encode({"aborted": aborted}))

    async def flush_cache(self: OpenAIIngress, request: Request) -> Response:
        done = await asyncio.gather(*(m.server.flush_cache.remote() for m in self.models.values()))
        if not all(done):
            return json_response(
                b'{"success": false, "message": "requests are running; try again when idle"}', 409
            )
        return json_response(b'{"success": true}')

    async def load_lora_adapter(self: OpenAIIngress, request: Request) -> Response:
        """``{"lora_name", "lora_path", "pinned", "model"}``: checked here; answered once every ingress replica
        serves it, and every LLM replica applies it before its next call."""
        req = decode_lora(LoadLoRAAdapterRequest, await self._body(request))
        await self._lora_model(req.model).lora.load(req)
        return json_response(b'{"success": true}')

    async def unload_lora_adapter(self: OpenAIIngress, request: Request) -> Response:
        """``{"lora_name", "model"}``: new requests for it fail at once; requests already using it finish."""
        req = decode_lora(UnloadLoRAAdapterRequest, await self._body(request))
        model = self._lora_model(req.model, holding=req.lora_name)
        await model.lora.unload(req)
        return json_response(b'{"success": true}')

    def _lora_model(self: OpenAIIngress, name: str | None, holding: str | None = None) -> ServedModel:
        """The model a LoRA request is for: ``name``, else the one holding the adapter ``holding``, else the app's
        only model with LoRA enabled (or its first model, which then refuses)."""
        if name is not None:
            return self._model(name)
        if holding is not None:
            for model in self.models.values():
                if holding in model.lora.adapters:
                    return model
        enabled = [m for m in self.models.values() if m.lora.enabled]
        if len(enabled) > 1:
            raise InvalidRequestError(
                "Several models serve LoRA adapters here: name the base model in 'model'.", param="model"
            )
        return enabled[0] if enabled else self.default


def _server_entry(model: ServedModel, info: dict[str, Any]) -> dict[str, Any]:
    return {
        **info["engine_args"],
        "served_model_name": model.model_id,
        "context_length": model.context_length,
        "max_model_len": model.context_length,
        "internal_states": [info["stats"]],
        "replica_id": info.get("replica_id"),  # the LLMServer replica that answered
    }
