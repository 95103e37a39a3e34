"""``Preprocessor``: the ingress's CPU-bound request work — size limits, chat templates, tokenizing, validation.

Invariant: every method here is synchronous and may take seconds on a big request (an 8 MB message renders and
tokenizes for many seconds on a small CPU), so the ingress runs them in its thread pool, never on its event loop:
``/health`` and the streams of other requests keep flowing meanwhile. The cheap limits of
:class:`~sgl_ray.protocol.RequestLimits` run first, so an oversized request is refused before it is tokenized.
Everything here only reads shared state (the tokenizer is used read-only: truncation and padding stay unset), so
several pool threads may run it at once. The one exception is :meth:`Preprocessor.fetch_images`, a coroutine the
ingress awaits on its event loop first: a slow image host then holds up only its own request, never a pool thread.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from sgl_ray import protocol as P
from sgl_ray.errors import InvalidRequestError
from sgl_ray.multimodal.chat import IngressImages, generate_image_lists, split_chat_images
from sgl_ray.multimodal.inputs import InvalidImageError, is_http_url
from sgl_ray.sampling.params import SamplingParams


class ChatInputs(NamedTuple):
    ids: list[int]
    params: SamplingParams
    parsing: P.OutputParsing


class CompletionInputs(NamedTuple):
    prompts: list[list[int]]
    prompt_texts: list[str] | None  # the prompts as text, for echo of token-id prompts
    params: SamplingParams


class GenerateInputs(NamedTuple):
    calls: list[tuple[list[list[int]], SamplingParams]]  # one replica call per distinct parameter set
    batch: bool  # the request passed a list of prompts: answer with a list


class Preprocessor:
    """Request → prompt token ids and engine sampling parameters, for one served model.

    Example (what ``OpenAIIngress`` does, in its thread pool)::

        >>> pre = Preprocessor(tokenizer, limits, context_length=8192, vocab_size=49152, tool_parser=None,
        ...                    reasoning_parser=None, calls_as_text=None)  # doctest: +SKIP
        >>> ids, params, parsing = pre.chat(P.decode_request("chat", body))  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: Any,
        limits: P.RequestLimits,
        *,
        context_length: int,
        vocab_size: int,
        tool_parser: str | None,
        reasoning_parser: type | None,
        calls_as_text: Any,
        trust_request_chat_template: bool = False,
        images: IngressImages | None = None,
    ) -> None:
        """``images``: a vision-language model's image side (None: image parts are a 400)."""
        self.tokenizer, self.limits = tokenizer, limits
        self.context_length, self.vocab_size = context_length, vocab_size
        self.tool_parser, self.reasoning_parser = tool_parser, reasoning_parser
        self.calls_as_text = calls_as_text
        self.trust_request_chat_template = trust_request_chat_template
        self.images = images

    async def fetch_images(self, req: P.ChatCompletionRequest | P.GenerateRequest) -> dict[str, bytes]:
        """The request's ``http(s)`` image URLs fetched, concurrently, on the caller's event loop (``{url:
        bytes}``, for :meth:`chat` or :meth:`generate`); empty for a text model or a request without any. The count
        limit applies first, so a request with too many images fetches none."""
        if self.images is None:
            return {}
        from sgl_ray.multimodal.fetch import fetch_images

        if isinstance(req, P.GenerateRequest):
            groups = [
                (param, items, [f"{param}[{j}]" for j in range(len(items))])
                for param, items in generate_image_lists(req.image_data, _is_batch(req))
            ]
        else:
            _, images, names = split_chat_images(req.messages, "")
            groups = [("messages", images, names)] if images else []
        limit = self.images.limits.max_images
        urls: list[str] = []
        url_names: list[str] = []
        for param, images, names in groups:
            if len(images) > limit:
                raise InvalidImageError(
                    f"{param}: {len(images)} images, over the limit of {limit}", param=param
                )
            http = [(url, name) for url, name in zip(images, names, strict=True) if is_http_url(url)]
            urls += [url for url, _ in http]
            url_names += [name for _, name in http]
        return await fetch_images(urls, url_names, self.images.limits) if urls else {}

    def chat(self, req: P.ChatCompletionRequest, fetched: dict[str, bytes] | None = None) -> ChatInputs:
        """A chat request's prompt ids, sampling parameters and output parsing (tools, reasoning); ``fetched``:
        its images from :meth:`fetch_images` (an ``http(s)`` URL not in it is fetched here, on this thread)."""
        self.limits.check_sequences(req.n or 1, param="n")
        self.limits.check_messages(req.messages)
        parsing = P.chat_output_parsing(req, self.tool_parser, self.reasoning_parser)
        messages, urls, names = IngressImages.split_for(self.images, req.messages)
        ids = P.render_chat(
            self.tokenizer,
            messages,
            req.generation_prompt,
            tools=req.tools if parsing.tools and parsing.tools.parser else None,
            template_kwargs=req.chat_template_kwargs,
            calls_as_text=self.calls_as_text,
            trust_request_chat_template=self.trust_request_chat_template,
            continue_final_message=bool(req.continue_final_message),
        )
        if urls:  # an ImagePrompt: placeholders expanded, the images with it
            images = [fetched.get(url, url) for url in urls] if fetched else urls
            ids = self.images.attach(ids, images, names, self.vocab_size)  # type: ignore[union-attr]
        P.check_prompt_length(len(ids), self.context_length)
        params = P.to_sampling_params(req, self.vocab_size, self.context_length, len(ids))
        # A reasoning parser's structural tag compiles the grammar here: its errors name the request's field.
        with P.grammar_errors(req.grammar_param):
            params = P.output_params(req, params, parsing)
        return ChatInputs(ids, params, parsing)

    def completion(self, req: P.CompletionRequest) -> CompletionInputs:
        texts, token_lists = req.prompt_batch()
        num_prompts = len(texts if texts is not None else token_lists or [])
        self.limits.check_sequences(num_prompts * (req.n or 1), param="n" if num_prompts == 1 else "prompt")
        prompt_texts = None
        if token_lists is None:
            for text in texts or []:
                self.limits.check_prompt(text)
            token_lists = [self.tokenizer.encode(t) for t in texts or []]
        for ids in token_lists:  # the length first: it bounds the loop over the ids
            P.check_prompt_length(len(ids), self.context_length, param="prompt")
            P.check_prompt_ids(ids, self.vocab_size)
        if texts is None and req.echo:
            prompt_texts = [self.tokenizer.decode(ids) for ids in token_lists]
        longest = max(len(ids) for ids in token_lists)
        params = P.to_sampling_params(req, self.vocab_size, self.context_length, longest)
        return CompletionInputs(token_lists, prompt_texts, params)

    def generate(self, req: P.GenerateRequest, fetched: dict[str, bytes] | None = None) -> GenerateInputs:
        """SGLang-native ``/generate``: prompts, one parameter set for all or one per prompt, each prompt's
        ``max_new_tokens`` checked against the context as the ``/v1`` routes check ``max_tokens``; ``fetched`` as
        for :meth:`chat`."""
        ids_in = req.input_ids
        texts = [req.text] if isinstance(req.text, str) else req.text
        batch = _is_batch(req)
        num_prompts = len(texts) if texts is not None else (len(ids_in or []) if batch else 1)
        sp = req.sampling_params
        if isinstance(sp, list) and len(sp) != num_prompts:
            raise InvalidRequestError(
                "sampling_params list must match the number of prompts", param="sampling_params"
            )
        if req.separate_reasoning and self.reasoning_parser is None:
            raise InvalidRequestError(
                "'separate_reasoning' needs a server started with a reasoning parser (--reasoning-parser).",
                param="separate_reasoning",
            )
        if isinstance(sp, list):
            per_prompt = [p.normalized() for p in sp]
            sequences = sum(p.n for p in per_prompt)
        else:
            per_prompt = [(sp or SamplingParams()).normalized()] * num_prompts
            sequences = num_prompts * per_prompt[0].n if per_prompt else 0
        # Each distinct parameter set's token ids (stop_token_ids, logit_bias) against the vocabulary.
        for params in per_prompt if isinstance(sp, list) else per_prompt[:1]:
            params.validate(self.vocab_size)
        self.limits.check_sequences(sequences, param="sampling_params")
        if texts is not None:
            for text in texts:
                self.limits.check_prompt(text, param="text")
            prompts = [self.tokenizer.encode(t) for t in texts]
        else:
            prompts = [list(x) for x in ids_in] if batch else [list(ids_in)]  # type: ignore[arg-type, list-item, union-attr]
        image_data = _with_fetched(req.image_data, fetched) if fetched else req.image_data
        prompts = IngressImages.attach_generate(self.images, prompts, image_data, batch, self.vocab_size)
        param = "text" if texts is not None else "input_ids"
        for ids in prompts:
            P.check_prompt_length(len(ids), self.context_length, param=param)
            P.check_prompt_ids(ids, self.vocab_size, param="input_ids")
        for ids, params in zip(prompts, per_prompt, strict=True):
            P.check_token_budget(len(ids), params.max_new_tokens, self.context_length, param="max_new_tokens")
        if isinstance(sp, list):
            calls = [([ids], p) for ids, p in zip(prompts, per_prompt, strict=True)]
        else:  # all prompts in one call when they share their parameters
            calls = [(prompts, per_prompt[0])]
        return GenerateInputs(calls, batch)

    def tokenize(self, req: P.TokenizeRequest) -> bytes:
        """``/tokenize``'s response body."""
        texts = [req.text] if isinstance(req.text, str) else req.text
        for text in texts:
            self.limits.check_prompt(text, param="text")
        tokens = [self.tokenizer.encode(t) for t in texts]
        return msgspec.json.encode({"tokens": tokens[0] if isinstance(req.text, str) else tokens})


def _is_batch(req: P.GenerateRequest) -> bool:
    """Whether a ``/generate`` request passed a list of prompts (and so gets a list of results)."""
    ids_in = req.input_ids
    return isinstance(req.text, list) or (bool(ids_in) and isinstance(ids_in[0], list))  # type: ignore[index]


def _with_fetched(image_data: Any, fetched: dict[str, bytes]) -> Any:
    """``image_data`` with each fetched URL replaced by its bytes, in the same nesting."""
    if isinstance(image_data, (list, tuple)):
        return [_with_fetched(item, fetched) for item in image_data]
    return fetched.get(image_data, image_data) if isinstance(image_data, str) else image_data
