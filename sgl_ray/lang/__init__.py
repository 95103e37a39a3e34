"""The frontend language: LLM programs with ``gen``, ``select``, roles, ``fork`` and batching.

Example (against ``sgl-ray serve`` on its default address)::

    >>> import sgl_ray.lang as sgl
    >>> @sgl.function
    ... def qa(s, question):
    ...     s += sgl.system("You are a concise assistant.")
    ...     s += sgl.user(question)
    ...     s += sgl.assistant(sgl.gen("answer", max_tokens=32))
    >>> sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:8000"))  # doctest: +SKIP
    >>> qa.run("What is the capital of France?", temperature=0)["answer"]  # doctest: +SKIP
"""

from __future__ import annotations

from sgl_ray.lang.backends import Backend, EngineBackend, OpenAI, RuntimeEndpoint
from sgl_ray.lang.choices import (
    ChoicesMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from sgl_ray.lang.ir import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    image,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from sgl_ray.lang.program import SglFunction, function, get_default_backend, set_default_backend
from sgl_ray.lang.state import ForkGroup, ProgramState
from sgl_ray.lang.template import RoleFormat, role_format_from_tokenizer

__all__ = [
    "Backend",
    "ChoicesMethod",
    "EngineBackend",
    "ForkGroup",
    "OpenAI",
    "ProgramState",
    "RoleFormat",
    "RuntimeEndpoint",
    "SglFunction",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "function",
    "gen",
    "get_default_backend",
    "greedy_token_selection",
    "image",
    "role_format_from_tokenizer",
    "select",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
]
