"""Images in chat messages and native ``/generate`` bodies, for the ingress's preprocessing.

An OpenAI ``image_url`` content part becomes a text part holding the model's image placeholder (Qwen2-VL:
``<|vision_start|><|image_pad|><|vision_end|>``, LLaVA: ``<image>``, Gemma 3: ``<start_of_image>``) where it stood, so any chat template
renders it; the image itself is read by the model's processor and named in errors by its part
(``messages[0].content[1]``). A prompt with images travels to a replica as an :class:`ImagePrompt`.
"""

from __future__ import annotations

from typing import Any

from sgl_ray.multimodal.inputs import ImageLimits, InvalidImageError, MultimodalInputs

_QWEN_VL = "<|vision_start|><|image_pad|><|vision_end|>"
PLACEHOLDERS = {
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,
    "LlavaNextForConditionalGeneration": "<image>",
    "LlavaOnevisionForConditionalGeneration": "<image>",
    "Gemma3ForConditionalGeneration": "<start_of_image>",
}


class ImagePrompt(list):
    """Prompt token ids (image placeholders expanded) that carry their :class:`MultimodalInputs`: what the
    ingress hands a replica for a prompt with images (a plain list of ids elsewhere; it pickles with its images).
    ``vocab_size`` (the served model's) lets :meth:`cache_ids` key the images as the replica's radix cache does.

    >>> prompt = ImagePrompt([1, 2, 3], None)
    >>> prompt, prompt.multimodal, prompt.cache_ids()
    ([1, 2, 3], None, [1, 2, 3])
    """

    def __init__(self, ids: list[int], multimodal: MultimodalInputs | None, vocab_size: int = 0) -> None:
        super().__init__(ids)
        self.multimodal = multimodal
        self.vocab_size = vocab_size

    def cache_ids(self) -> list[int]:
        """The ids as the scheduler's radix cache holds them: each image's tokens replaced by its key id
        (:meth:`MultimodalInputs.keyed_ids`), so the cache-aware router hashes what the replicas publish."""
        if self.multimodal is None or not self.vocab_size:
            return list(self)
        return self.multimodal.keyed_ids(self, self.vocab_size)


def image_placeholder(hf_config: Any) -> str:
    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    return PLACEHOLDERS[arch]


def split_chat_images(messages: list[Any], placeholder: str) -> tuple[list[Any], list[str], list[str]]:
    """``(messages with each image part replaced by a text part of the placeholder, the images' URLs, the part
    names)``; messages without images are returned as they are.

    >>> from sgl_ray.protocol.requests import ChatMessage, ContentPart
    >>> msg = ChatMessage(role="user", content=[ContentPart(type="image_url", image_url={"url": "data:,"}),
    ...                                         ContentPart(type="text", text="What is it?")])
    >>> out, urls, names = split_chat_images([msg], "<image>")
    >>> out[0].text(), urls, names
    ('<image>\\nWhat is it?', ['data:,'], ['messages[0].content[0]'])
    """
    from sgl_ray.protocol.requests import ContentPart

    urls: list[str] = []
    names: list[str] = []
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if not isinstance(content, list) or not any(p.type == "image_url" for p in content):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if part.type != "image_url":
                parts.append(part)
                continue
            name = f"messages[{i}].content[{j}]"
            url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
            if not isinstance(url, str) or not url:
                raise InvalidImageError(f"{name}: an image_url part needs image_url.url", param=name)
            urls.append(url)
            names.append(name)
            parts.append(ContentPart(type="text", text=placeholder))
        out.append(_replace_content(message, parts))
    return out, urls, names


def _replace_content(message: Any, parts: list[Any]) -> Any:
    import msgspec

    return msgspec.structs.replace(message, content=parts)


class IngressImages:
    """The ingress's image side for one served model: placeholders in chat messages, the processor for images.

    Example (what ``Preprocessor`` does)::

        >>> images = IngressImages.for_model(hf_config, model_dir)  # doctest: +SKIP
        >>> messages, urls, names = images.split(req.messages)  # doctest: +SKIP
        >>> prompt = images.attach(render_chat(tokenizer, messages), urls, names)  # doctest: +SKIP
    """

    def __init__(self, processor: Any, placeholder: str) -> None:
        self.processor = processor
        self.placeholder = placeholder

    @property
    def limits(self) -> ImageLimits:
        return self.processor.limits

    @classmethod
    def for_model(
        cls,
        hf_config: Any,
        directory: str,
        allowed_local_media_path: str | None = None,
        *,
        limits: ImageLimits | None = None,
    ) -> IngressImages | None:
        """None for a text model. ``limits`` (default: the server's, :meth:`ImageLimits.for_server`)."""
        from sgl_ray.multimodal.processor import create_processor

        limits = limits or ImageLimits.for_server(allowed_local_media_path)
        processor = create_processor(hf_config, directory, limits)
        return None if processor is None else cls(processor, image_placeholder(hf_config))

    @staticmethod
    def split_for(
        images: IngressImages | None, messages: list[Any]
    ) -> tuple[list[Any], list[str], list[str]]:
        """:meth:`split` of ``images``; for a text model (None) a 400 naming the first image part, if any."""
        if images is not None:
            return images.split(messages)
        _, urls, names = split_chat_images(messages, "")
        if urls:
            raise InvalidImageError(f"{names[0]}: this model takes no image inputs", param=names[0])
        return messages, [], []

    def split(self, messages: list[Any]) -> tuple[list[Any], list[str], list[str]]:
        return split_chat_images(messages, self.placeholder)

    def attach(self, ids: list[int], urls: list[Any], names: list[str], vocab_size: int = 0) -> list[int]:
        """The rendered prompt's ids with its images (URLs, or their fetched bytes): an :class:`ImagePrompt`
        (``ids`` as they are without)."""
        if not urls:
            return ids
        expanded, mm = self.processor.process(ids, urls, "messages", names)
        return ImagePrompt(expanded, mm, vocab_size)

    @staticmethod
    def attach_generate(
        images: IngressImages | None,
        prompts: list[list[int]],
        image_data: Any,
        batch: bool,
        vocab_size: int = 0,
    ) -> list[list[int]]:
        """Native ``/generate``'s ``image_data`` applied to its prompts (see ``processor.attach_images``)."""
        from sgl_ray.multimodal.processor import attach_images

        if image_data is None:
            return prompts
        expanded, mms = attach_images(images.processor if images else None, prompts, image_data, batch)
        return [
            ids if mm is None else ImagePrompt(ids, mm, vocab_size)
            for ids, mm in zip(expanded, mms, strict=True)
        ]


def generate_image_lists(image_data: Any, batch: bool) -> list[tuple[str, list[Any]]]:
    """``/generate``'s ``image_data`` as ``(param, images)`` per prompt, each image named ``f"{param}[{j}]"`` as
    the processor names it. A shape that does not fit a batch gives none here (the processor refuses it later).

    >>> generate_image_lists([["a", "b"], "c"], batch=True)
    [('image_data[0]', ['a', 'b']), ('image_data[1]', ['c'])]
    """
    if image_data is None:
        return []
    if not batch:
        per_prompt, params = [image_data], ["image_data"]
    elif isinstance(image_data, (list, tuple)):
        per_prompt, params = list(image_data), [f"image_data[{i}]" for i in range(len(image_data))]
    else:
        return []
    return [
        (param, [] if items is None else list(items) if isinstance(items, (list, tuple)) else [items])
        for items, param in zip(per_prompt, params, strict=True)
    ]
