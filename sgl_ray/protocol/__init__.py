"""The OpenAI-compatible (and SGLang-native) wire protocol: request/response types and pure functions.

No HTTP and no Ray here: the server decodes a body, validates and converts it to engine terms, and turns the
engine's per-request output deltas back into OpenAI JSON.

Example (a non-streaming chat completion)::

    >>> from sgl_ray import protocol as P
    >>> req = P.decode_request("chat", body)  # InvalidRequestError (a 400) on any problem
    >>> ids = P.render_chat(tokenizer, req.messages, tools=req.tools, template_kwargs=req.chat_template_kwargs)
    >>> params = P.to_sampling_params(req, vocab_size, context_length, prompt_len=len(ids))
    >>> lp = P.logprob_options(req)  # return_logprob, top_logprobs_num, logprob_start_len for the engine
    >>> builder = P.ChatResponseBuilder.from_request(req, model="smollm2", token_texts=P.TokenTexts(tokenizer))
    >>> for index, out in engine_outputs:  # RequestOutput deltas of the n choices, any interleaving
    ...     builder.add(index, out)
    >>> P.encode(builder.build())  # bytes of the response body

Streaming uses :class:`ChatStreamAssembler` (``add`` → chunks, each sent as ``sse_event(chunk)``; then
``finish()`` and ``SSE_DONE``). Errors: ``error_body(err)`` with ``err.status_code``.

Tool calls and reasoning: ``parsing = P.chat_output_parsing(req, "qwen25", reasoning_parser_class)``, then
``params = P.output_params(req, params, parsing)`` (the forced call format, a grammar moved after the reasoning)
and ``parsing=parsing`` to either assembler (``reasoning_content``, ``tool_calls``, ``finish_reason: "tool_calls"``).
Callers that drive an engine directly render and plan the same way with :func:`tool_prompt`.

The Responses API (``/v1/responses``): ``P.decode_request("responses", body).to_chat()`` is the chat request it
means (inside ``with P.responses_errors():``); :class:`ResponseBuilder` / :class:`ResponseStreamAssembler` make its
output (see :mod:`sgl_ray.protocol.responses_api`).
"""

from __future__ import annotations

from sgl_ray.protocol.api_error import APIError
from sgl_ray.protocol.chat_output import ChatResponseBuilder, ChatStreamAssembler
from sgl_ray.protocol.chat_parsing import (
    ChoiceParser,
    OutputParsing,
    ParsedChoice,
    chat_output_parsing,
    constrain_output,
    output_params,
)
from sgl_ray.protocol.chat_template import check_template_kwargs, message_dicts, render_chat
from sgl_ray.protocol.checks import INT64_MAX, INT64_MIN, MAX_STOP_SEQUENCE_CHARS
from sgl_ray.protocol.choices import UsageTracker, visible_logprobs
from sgl_ray.protocol.completion_output import CompletionResponseBuilder, CompletionStreamAssembler
from sgl_ray.protocol.decoding import (
    MAX_JSON_DEPTH,
    REQUEST_TYPES,
    RequestKind,
    decode_request,
    decode_struct,
    too_deep,
    validation_error,
)
from sgl_ray.protocol.limits import RequestLimits
from sgl_ray.protocol.logprobs import TokenTexts, chat_logprob_entries, completion_logprobs
from sgl_ray.protocol.requests import (
    AbortRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    DetokenizeRequest,
    GenerateRequest,
    StreamOptions,
    TokenizeRequest,
    check_native_params,
    sampling_params_error,
    sampling_params_errors,
)
from sgl_ray.protocol.responses import (
    CHAT_SSE,
    SSE_DONE,
    AdapterCard,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobEntry,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    FunctionCall,
    FunctionCallDelta,
    GenerateResponse,
    ModelCard,
    ModelList,
    PromptLogprob,
    PromptTokensDetails,
    SSEFraming,
    ToolCallDeltaOut,
    ToolCallOut,
    TopLogprob,
    Usage,
    encode,
    error_body,
    internal_error_body,
    matched_stop,
    new_request_id,
    new_tool_call_id,
    now,
    openai_finish_reason,
    sse_error,
    sse_event,
)
from sgl_ray.protocol.responses_api import (
    ResponseBuilder,
    ResponseDraft,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamAssembler,
    responses_errors,
)
from sgl_ray.protocol.sampling import (
    CONTEXT_LENGTH_EXCEEDED,
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    MAX_N,
    MAX_STOP_SEQUENCES,
    LogprobOptions,
    check_prompt_ids,
    check_prompt_length,
    check_token_budget,
    logprob_options,
    to_sampling_params,
)
from sgl_ray.protocol.structured import (
    JsonSchemaFormat,
    ResponseFormat,
    grammar_error_for,
    grammar_errors,
    grammar_fields,
)
from sgl_ray.protocol.tool_prompt import ToolFormat, ToolPrompt, tool_prompt
from sgl_ray.protocol.tools import ToolChoice, ToolPlan, parse_function, parse_tool_choice, parse_tools

__all__ = [
    "APIError",
    "MAX_JSON_DEPTH",
    "RequestLimits",
    "check_template_kwargs",
    "check_token_budget",
    "too_deep",
    "CHAT_SSE",
    "ResponseBuilder",
    "ResponseDraft",
    "ResponseObject",
    "ResponseStreamAssembler",
    "ResponsesRequest",
    "SSEFraming",
    "ToolFormat",
    "ToolPrompt",
    "constrain_output",
    "parse_function",
    "responses_errors",
    "tool_prompt",
    "ChoiceParser",
    "FunctionCall",
    "FunctionCallDelta",
    "OutputParsing",
    "ParsedChoice",
    "ToolCallDeltaOut",
    "ToolCallOut",
    "ToolChoice",
    "ToolPlan",
    "chat_output_parsing",
    "new_tool_call_id",
    "output_params",
    "parse_tool_choice",
    "parse_tools",
    "JsonSchemaFormat",
    "ResponseFormat",
    "grammar_error_for",
    "grammar_errors",
    "grammar_fields",
    "CONTEXT_LENGTH_EXCEEDED",
    "MAX_CHAT_TOP_LOGPROBS",
    "MAX_COMPLETION_LOGPROBS",
    "MAX_N",
    "MAX_STOP_SEQUENCES",
    "MAX_STOP_SEQUENCE_CHARS",
    "INT64_MAX",
    "INT64_MIN",
    "check_native_params",
    "sampling_params_error",
    "sampling_params_errors",
    "REQUEST_TYPES",
    "SSE_DONE",
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatLogprobEntry",
    "ChatLogprobs",
    "ChatMessage",
    "ChatResponseBuilder",
    "ChatStreamAssembler",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionResponseBuilder",
    "CompletionStreamAssembler",
    "ContentPart",
    "GenerateRequest",
    "TokenizeRequest",
    "DetokenizeRequest",
    "AbortRequest",
    "GenerateResponse",
    "LogprobOptions",
    "AdapterCard",
    "ModelCard",
    "ModelList",
    "PromptTokensDetails",
    "RequestKind",
    "StreamOptions",
    "TokenTexts",
    "TopLogprob",
    "Usage",
    "UsageTracker",
    "chat_logprob_entries",
    "check_prompt_ids",
    "check_prompt_length",
    "completion_logprobs",
    "decode_request",
    "decode_struct",
    "encode",
    "error_body",
    "internal_error_body",
    "matched_stop",
    "PromptLogprob",
    "logprob_options",
    "message_dicts",
    "new_request_id",
    "now",
    "openai_finish_reason",
    "render_chat",
    "sse_error",
    "sse_event",
    "to_sampling_params",
    "validation_error",
    "visible_logprobs",
]
