"""``APIError``: how the Serve app's Python handle API reports a failed request — the HTTP status and the OpenAI
error body that the HTTP API would have answered with.

It survives Ray's exception wrapping: a caller of ``handle.chat.remote(body)`` catches ``APIError`` (Ray raises it
as ``RayTaskError(APIError)``, a subclass of both), and ``status_code``, ``body``, ``message``, ``type``,
``param`` and ``code`` read through to the original.
"""

from __future__ import annotations

from typing import Any

from sgl_ray.errors import SglRayError


class APIError(SglRayError):
    """A request the server refused or failed, with the HTTP ``status_code`` and OpenAI error ``body``
    (``{"error": {"message", "type", "param", "code"}}``) it would have had over HTTP.

    Example::

        >>> from sgl_ray.errors import InvalidRequestError
        >>> e = APIError.from_error(InvalidRequestError("Invalid 'n'.", param="n"))
        >>> e.status_code, e.type, e.param, e.body["error"]["message"]
        (400, 'invalid_request_error', 'n', "Invalid 'n'.")
    """

    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        error = body.get("error") or {}
        super().__init__(str(error.get("message", "")), param=error.get("param"), code=error.get("code"))
        self._status = status_code
        self._type = str(error.get("type", "internal_error"))
        self.body = body

    # Properties, not class attributes: through Ray's RayTaskError(APIError) wrapper an attribute the class
    # defines would shadow the original's value; these read the original's fields instead.
    @property
    def status_code(self) -> int:  # type: ignore[override]
        return self._status

    @property
    def error_type(self) -> str:  # type: ignore[override]
        return self._type

    @property
    def type(self) -> str:
        """The OpenAI error type (``invalid_request_error``, ``not_found_error``, …)."""
        return self._type

    @classmethod
    def from_error(cls, err: SglRayError) -> APIError:
        return cls(err.status_code, err.to_dict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._status, self.body))
