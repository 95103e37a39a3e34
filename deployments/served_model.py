"""``ServedModel``: one model behind an ingress — its tokenizer and request processing, the handle of its
``LLMServer`` deployment, and its LoRA adapters. An app built from several Ray Serve LLM-style ``llm_configs``
has one per model; the ingress picks one by the request's ``model``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from sgl_ray import protocol as P
from sgl_ray.configs.model_config import ModelConfig
from sgl_ray.deployments.lora import LoadLoRAAdapterRequest
from sgl_ray.deployments.lora_ingress import IngressAdapters
from sgl_ray.deployments.preprocess import Preprocessor
from sgl_ray.errors import ModelNotFoundError
from sgl_ray.lang.template import role_format_from_tokenizer
from sgl_ray.lora.adapter import parse_lora_paths
from sgl_ray.model_loader import load_hf_config, load_tokenizer, resolve_model
from sgl_ray.multimodal.chat import IngressImages
from sgl_ray.multimodal.inputs import ImageLimits
from sgl_ray.reasoning import get_reasoning_parser

logger = logging.getLogger(__name__)


class ServedModel:
    """One served model. ``config``: ``model_path`` and, optionally, ``served_model_name``, the
    :class:`~sgl_ray.protocol.RequestLimits` options, ``trust_request_chat_template``, the engine's
    ``context_length``, ``tokenizer_path``, ``tool_call_parser``, ``reasoning_parser`` and LoRA options, and
    ``dynamic_lora_loading_path`` (Ray Serve LLM's: a request for ``<model>:<adapter>`` loads the adapter from
    ``<path>/<adapter>`` the first time), and the image options of :meth:`ImageLimits.from_options`.
    ``registry``: the app's ``LoRARegistry`` handle for this model, or None.

    Example (what ``OpenAIIngress`` does for each of its models)::

        >>> model = ServedModel(server_handle, {"model_path": path, "served_model_name": "m"})  # doctest: +SKIP
        >>> model.owns("m:my-adapter")  # doctest: +SKIP
        True
    """

    def __init__(self, server: Any, config: dict[str, Any], registry: Any = None) -> None:
        self.server = server
        self.model_path = config["model_path"]
        self.model_id = config.get("served_model_name") or self.model_path
        source = resolve_model(self.model_path)
        self.tokenizer = load_tokenizer(source, config.get("tokenizer_path"))
        self.token_texts = P.TokenTexts(self.tokenizer)
        self.hf_config = load_hf_config(source)
        mc = ModelConfig(self.hf_config, torch.float32, config.get("context_length"))
        self.context_length, self.vocab_size = mc.context_length, mc.vocab_size
        self.created = P.now()
        self.role_format = role_format_from_tokenizer(self.tokenizer, self.hf_config).to_dict()
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
            images=IngressImages.for_model(
                self.hf_config, source.local_dir, limits=ImageLimits.from_options(config)
            ),
        )
        self.lora = IngressAdapters(
            self.model_id,
            self.hf_config,
            int(config.get("max_lora_rank") or 0),
            bool(config.get("enable_lora")),
            registry,
            {name: (path, False) for name, path in parse_lora_paths(config.get("lora_paths")).items()},
            allow_pickle=bool(config.get("lora_allow_pickle")),
        )
        self.dynamic_lora_path: str | None = config.get("dynamic_lora_loading_path")

    def owns(self, model: str) -> bool:
        """Whether ``model`` names this model or one of its adapters (as far as this replica knows)."""
        base, sep, _ = model.rpartition(":")
        return model == self.model_id or (bool(sep) and base == self.model_id) or model in self.lora.adapters

    async def resolve(self, model: str | None) -> str | None:
        """The adapter ``model`` names (None: the base model); with a ``dynamic_lora_loading_path``, an adapter
        named ``<model>:<adapter>`` that is not loaded yet is loaded from there first."""
        try:
            return await self.lora.resolve(model)
        except ModelNotFoundError:
            base, sep, adapter = (model or "").rpartition(":")
            if self.dynamic_lora_path is None or not sep or base != self.model_id or not adapter:
                raise
        path = f"{self.dynamic_lora_path.rstrip('/')}/{adapter}"
        logger.info("loading LoRA adapter %r of %r from %s", adapter, self.model_id, path)
        try:
            await self.lora.load(LoadLoRAAdapterRequest(lora_name=adapter, lora_path=path))
        except Exception as e:  # a missing or bad adapter directory: the model does not exist
            if await self.lora.known(adapter):  # another request loaded it meanwhile
                return adapter
            raise ModelNotFoundError(
                f"The model '{model}' does not exist ({e}).", param="model", code="model_not_found"
            ) from None
        return adapter

    def cards(self) -> list[P.ModelCard]:
        """This model's entries in ``GET /v1/models``: the base model, then its adapters."""
        cards: list[P.ModelCard] = [
            P.ModelCard(id=self.model_id, created=self.created, max_model_len=self.context_length)
        ]
        cards += [
            P.AdapterCard(
                id=name,
                created=self.created,
                parent=self.model_id,
                root=path,
                max_model_len=self.context_length,
            )
            for name, (path, _) in self.lora.adapters.items()
        ]
        return cards

    def info(self) -> dict[str, Any]:
        """SGLang's ``/get_model_info``: the model, its context length and its chat template's role strings."""
        return {
            "model_path": self.model_path,
            "served_model_name": self.model_id,
            "is_generation": True,
            "context_length": self.context_length,
            "max_model_len": self.context_length,
            "role_format": self.role_format,
        }
