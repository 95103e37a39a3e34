"""Chat templates the engine supplies for models whose tokenizer has none (GGUF files often carry no template).

A template is chosen by the config's ``model_type`` (:func:`builtin_chat_template`); a tokenizer with a template
of its own always keeps it.

Gemma's turn format (Gemma 1-3, base and instruction-tuned checkpoints): every turn is
``<start_of_turn>{user|model}\\n{content}<end_of_turn>\\n`` after one ``<bos>``, and the model's reply starts after
``<start_of_turn>model\\n``. Gemma has no system role: a system message opens the first user turn, followed by a
blank line. Contents are trimmed of surrounding whitespace, as Google's template does.
"""

from __future__ import annotations

from typing import Any

GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}"
    "{{- raise_exception('Gemma takes a system message only as the first message') -}}"
    "{%- endif -%}"
    "{%- set ns.system = message['content'] | trim + '\\n\\n' -%}"
    "{%- elif message['role'] in ('user', 'assistant') -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{- '<start_of_turn>' + role + '\\n' + ns.system + message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- set ns.system = '' -%}"
    "{%- else -%}"
    "{{- raise_exception('Gemma has no ' + message['role'] + ' role (only system, user, assistant)') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_BY_MODEL_TYPE = {
    "gemma": GEMMA_CHAT_TEMPLATE,
    "gemma2": GEMMA_CHAT_TEMPLATE,
    "gemma3": GEMMA_CHAT_TEMPLATE,
    "gemma3_text": GEMMA_CHAT_TEMPLATE,
}


def builtin_chat_template(model_type: str | None) -> str | None:
    """The engine's chat template for models of ``model_type``, or None.

    >>> builtin_chat_template("gemma3_text") is GEMMA_CHAT_TEMPLATE, builtin_chat_template("llama")
    (True, None)
    """
    return _BY_MODEL_TYPE.get(model_type or "")


def ensure_chat_template(tokenizer: Any, model_type: str | None) -> Any:
    """Give ``tokenizer`` the built-in template of ``model_type`` if it has no template; returns it.

    >>> from types import SimpleNamespace
    >>> ensure_chat_template(SimpleNamespace(chat_template=None), "gemma2").chat_template is GEMMA_CHAT_TEMPLATE
    True
    """
    if not getattr(tokenizer, "chat_template", None):
        template = builtin_chat_template(model_type)
        if template is not None:
            tokenizer.chat_template = template
    return tokenizer
