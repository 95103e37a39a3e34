"""OpenAI's Responses API (``POST /v1/responses``) on the chat path: requests become chat requests
(:mod:`.request`), the one choice's output becomes output items (:mod:`.output`) or stream events
(:mod:`.stream`), in the shapes of :mod:`.objects`. Stateless: nothing is stored.

Example (what the ingress does)::

    >>> from sgl_ray import protocol as P
    >>> req = P.decode_request("responses", body)  # doctest: +SKIP
    >>> with P.responses_errors():  # 400s name the Responses API's fields  # doctest: +SKIP
    ...     chat = req.to_chat()  # then the chat path: template, tool plan, sampling params, parsing
    >>> builder = P.ResponseBuilder(P.ResponseDraft(req, model="smollm2"), parsing)  # doctest: +SKIP
"""

from __future__ import annotations

from sgl_ray.protocol.responses_api.objects import (
    FunctionCallItem,
    MessageItem,
    OutputText,
    ReasoningItem,
    ResponseObject,
    ResponseUsage,
)
from sgl_ray.protocol.responses_api.output import ResponseBuilder, ResponseDraft, response_status
from sgl_ray.protocol.responses_api.request import ResponsesRequest, responses_errors
from sgl_ray.protocol.responses_api.stream import ResponseStreamAssembler

__all__ = [
    "FunctionCallItem",
    "MessageItem",
    "OutputText",
    "ReasoningItem",
    "ResponseBuilder",
    "ResponseDraft",
    "ResponseObject",
    "ResponseStreamAssembler",
    "ResponseUsage",
    "ResponsesRequest",
    "response_status",
    "responses_errors",
]
