"""Per-request size limits of the HTTP server: characters per chat message and per prompt, and sequences
(prompts × ``n``) per request.

Invariant: every check here costs a length or a count, never a tokenization, so an oversized request is a 400
before it has cost the server any CPU worth mentioning. Each error names the server option that sets the limit,
so whoever runs the server knows what to raise.

Example::

    >>> limits = RequestLimits.for_context(8192)
    >>> limits.max_prompt_chars, limits.max_message_chars, limits.max_sequences_per_request
    (131072, 131072, 1024)
    >>> limits.check_sequences(2 * 8, param="n")  # two prompts, n=8: fine
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sgl_ray.errors import InvalidRequestError
from sgl_ray.protocol.requests import ChatMessage

CHARS_PER_CONTEXT_TOKEN = 16
"""The default ``max_prompt_chars`` is this many characters per token of context: natural text runs at about 4
characters per token, so a prompt past this bound cannot fit the context anyway, and tokenizing it only to say so
would be the expensive part of the request."""
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 1024


@dataclass(frozen=True)
class RequestLimits:
    """``max_prompt_chars``: characters of one text prompt (``/v1/completions``, ``/generate``, ``/tokenize``) and
    of all the messages of one chat request together; ``max_message_chars``: characters of one chat message's
    content; ``max_sequences_per_request``: prompts × ``n`` of one request."""

    max_prompt_chars: int
    max_message_chars: int
    max_sequences_per_request: int = DEFAULT_MAX_SEQUENCES_PER_REQUEST

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_message_chars", "max_sequences_per_request"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {value!r}", param=name)

    @classmethod
    def for_context(
        cls,
        context_length: int,
        *,
        max_prompt_chars: int | None = None,
        max_message_chars: int | None = None,
        max_sequences_per_request: int | None = None,
    ) -> RequestLimits:
        """The limits of a server whose model has ``context_length`` tokens; unset ones take their defaults
        (``max_prompt_chars``: :data:`CHARS_PER_CONTEXT_TOKEN` per context token; ``max_message_chars``:
        ``max_prompt_chars``; ``max_sequences_per_request``: :data:`DEFAULT_MAX_SEQUENCES_PER_REQUEST`)."""
        prompt = (
            max_prompt_chars if max_prompt_chars is not None else CHARS_PER_CONTEXT_TOKEN * context_length
        )
        return cls(
            max_prompt_chars=prompt,
            max_message_chars=max_message_chars if max_message_chars is not None else prompt,
            max_sequences_per_request=max_sequences_per_request
            if max_sequences_per_request is not None
            else DEFAULT_MAX_SEQUENCES_PER_REQUEST,
        )

    def check_prompt(self, text: str, *, param: str = "prompt") -> None:
        """A 400 if one text prompt is longer than ``max_prompt_chars``."""
        if len(text) > self.max_prompt_chars:
            raise _too_long(param, len(text), self.max_prompt_chars, "per prompt", "max_prompt_chars")

    def check_messages(self, messages: Sequence[ChatMessage]) -> None:
        """A 400 if one message's content is longer than ``max_message_chars``, or all of them together longer
        than ``max_prompt_chars``."""
        total = 0
        for i, message in enumerate(messages):
            size = _content_chars(message)
            if size > self.max_message_chars:
                raise _too_long(
                    f"messages[{i}].content",
                    size,
                    self.max_message_chars,
                    "per message",
                    "max_message_chars",
                    param="messages",
                )
            total += size
        if total > self.max_prompt_chars:
            raise _too_long(
                "messages", total, self.max_prompt_chars, "for all messages together", "max_prompt_chars"
            )

    def check_sequences(self, num_sequences: int, *, param: str) -> None:
        """A 400 if a request asks for more than ``max_sequences_per_request`` sequences (prompts × ``n``)."""
        if num_sequences > self.max_sequences_per_request:
            raise InvalidRequestError(
                f"This request asks for {num_sequences} sequences (prompts × n); this server generates at most "
                f"{self.max_sequences_per_request} per request (max_sequences_per_request).",
                param=param,
                code="integer_above_max_value",
            )


def _content_chars(message: ChatMessage) -> int:
    content = message.content
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    return sum(len(part.text or "") for part in content)


def _too_long(
    field: str, size: int, limit: int, per: str, option: str, *, param: str | None = None
) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid '{field}': string too long. Expected at most {limit} characters {per} ({option} of this "
        f"server), but got {size} characters instead.",
        param=param or field,
        code="string_above_max_length",
    )
