"""A small JSON/SSE client over urllib, turning server error bodies into typed :mod:`sgl_ray.errors`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from sgl_ray.errors import InvalidRequestError, ModelNotFoundError, RemoteError, SglRayError


def error_from_body(status: int, body: Any) -> SglRayError:
    """The typed exception for an OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` body."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body)[:500]}
    message = str(err.get("message") or f"HTTP {status}")
    kw = {"param": err.get("param"), "code": err.get("code")}
    if status == 400:
        return InvalidRequestError(message, **kw)
    if status == 404:
        return ModelNotFoundError(message, **kw)
    return RemoteError(message, status_code=status, error_type=str(err.get("type") or "server_error"), **kw)


_STATUS_OF_TYPE = {"invalid_request_error": 400, "not_found_error": 404}  # mid-stream errors carry no status


class JSONClient:
    """``get``/``post`` JSON and ``stream`` SSE events from one base URL, with an optional bearer key."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _open(self, method: str, path: str, body: Any = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
            raise error_from_body(e.code, payload) from None
        except urllib.error.URLError as e:
            raise RemoteError(
                f"cannot reach {self.base_url}: {e.reason}", status_code=503, error_type="connection_error"
            ) from None

    def get(self, path: str) -> Any:
        with self._open("GET", path) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        with self._open("POST", path, body) as r:
            return json.loads(r.read())

    def stream(self, path: str, body: Any) -> Iterator[Any]:
        """The ``data:`` payloads of a server-sent event stream until ``[DONE]``; an ``{"error": …}`` event
        raises."""
        with self._open("POST", path, body) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict) and "error" in event:
                    kind = (event["error"] or {}).get("type") if isinstance(event["error"], dict) else None
                    raise error_from_body(_STATUS_OF_TYPE.get(kind, 500), event)
                yield event
