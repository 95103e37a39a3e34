"""Tool-call parsers by name (SGLang's ``--tool-call-parser`` names), imported lazily, and detection from a chat
template."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from sgl_ray.errors import InvalidRequestError
from sgl_ray.function_call.base import ToolCallParser

# name → (module, class); the order is the detection order (the most specific markers first)
TOOL_CALL_PARSERS: dict[str, tuple[str, str]] = {
    "deepseekv3": ("sgl_ray.function_call.deepseekv3", "DeepSeekV3Parser"),
    "mistral": ("sgl_ray.function_call.mistral", "MistralParser"),
    "qwen25": ("sgl_ray.function_call.hermes", "Qwen25Parser"),
    "hermes": ("sgl_ray.function_call.hermes", "HermesParser"),
    "pythonic": ("sgl_ray.function_call.pythonic", "PythonicParser"),
    "llama3": ("sgl_ray.function_call.llama3", "Llama3Parser"),
}
DEFAULT_TOOL_CALL_PARSER = "hermes"  # for templates that show no call format: ChatML's common convention


def get_tool_call_parser(name: str) -> type[ToolCallParser]:
    """The parser class registered as ``name``.

    Example::

        >>> get_tool_call_parser("llama3").__name__
        'Llama3Parser'
    """
    if name not in TOOL_CALL_PARSERS:
        raise InvalidRequestError(
            f"tool_call_parser: unknown parser {name!r}; known: {sorted(TOOL_CALL_PARSERS)}",
            param="tool_call_parser",
        )
    module, cls = TOOL_CALL_PARSERS[name]
    return getattr(importlib.import_module(module), cls)


def detect_tool_call_parser(chat_template: str | Mapping[str, str] | None) -> str | None:
    """The parser whose call format the chat template writes (its markers appear in the template), or None.

    Example::

        >>> detect_tool_call_parser("{% for m in messages %}...<tool_call>\\n{{ tool_call | tojson }}...")
        'qwen25'
    """
    if isinstance(chat_template, Mapping):  # several named templates: look at all of them
        chat_template = "\n".join(chat_template.values())
    if not chat_template:
        return None
    for name in TOOL_CALL_PARSERS:
        if get_tool_call_parser(name).detect_template(chat_template):
            return name
    return None
