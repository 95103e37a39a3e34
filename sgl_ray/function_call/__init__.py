"""Tool calling: parsers of each model family's call format (whole output or streamed) and the grammar that forces
a model's output into calls.

Example::

    >>> from sgl_ray.function_call import Tool, get_tool_call_parser
    >>> parser = get_tool_call_parser("llama3")([Tool("get_weather", {"type": "object"})])
    >>> parser.parse('{"name": "get_weather", "parameters": {"city": "Paris"}}').calls
    [ToolCall(name='get_weather', arguments='{"city": "Paris"}')]
    >>> [parser.feed(piece) for piece in ('{"name": "get_weather", ', '"parameters": {"city"', ': "Paris"}}')][-1]
    StreamDelta(content='', calls=[ToolCallDelta(index=0, name=None, arguments=': "Paris"}')])
"""

from __future__ import annotations

from sgl_ray.function_call.base import (
    ParsedText,
    PartialCall,
    Scan,
    StreamDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
)
from sgl_ray.function_call.registry import (
    DEFAULT_TOOL_CALL_PARSER,
    TOOL_CALL_PARSERS,
    detect_tool_call_parser,
    get_tool_call_parser,
)

__all__ = [
    "DEFAULT_TOOL_CALL_PARSER",
    "TOOL_CALL_PARSERS",
    "ParsedText",
    "PartialCall",
    "Scan",
    "StreamDelta",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "detect_tool_call_parser",
    "get_tool_call_parser",
]
