"""Shared values of the wire-protocol tests: SmolLM2's vocabulary, and request bodies written as the official
``openai`` client sends them."""

from __future__ import annotations

import json
from typing import Any

from sgl_ray import protocol as P

VOCAB = 49152
CTX = 2048
EOS = 2  # SmolLM2's <|im_end|>
USER = {"role": "user", "content": "Hello!"}


def body_of(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def chat_request(**fields: Any) -> P.ChatCompletionRequest:
    return P.decode_request("chat", body_of(**{"model": "smollm2", "messages": [USER], **fields}))
