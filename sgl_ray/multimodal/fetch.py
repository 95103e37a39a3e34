"""``http(s)`` image URLs, fetched within the limits of :class:`~sgl_ray.multimodal.inputs.ImageLimits`.

Invariants: every byte read counts against ``max_image_bytes`` (a ``Content-Length`` header only refuses a body
early; it is never trusted to bound one); the whole fetch of a URL, redirects included, ends within
``fetch_timeout_s``; redirects are followed by hand, at most ``max_redirects`` of them, each to an ``http(s)``
URL only and, with ``allowed_media_domains``, on one of those hosts (the first URL too). Every failure is an
:class:`~sgl_ray.multimodal.inputs.InvalidImageError` naming the input (a 400 over HTTP).

The ingress awaits :func:`fetch_images` on its event loop (the images of one request concurrently, each URL once);
the in-process ``Engine`` reads a URL through :func:`fetch_image_blocking` on the caller's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

from sgl_ray.multimodal.inputs import ImageLimits, InvalidImageError

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


async def fetch_images(urls: Sequence[str], names: Sequence[str], limits: ImageLimits) -> dict[str, bytes]:
    """``{url: its bytes}`` for the distinct ``urls`` (``names[i]`` names ``urls[i]`` in errors), fetched
    concurrently; on a failure the others are cancelled and the first failing input (in order) is raised.

    Example::

        >>> url = "https://example.com/cat.png"
        >>> images = await fetch_images([url], ["messages[0].content[1]"], limits)  # doctest: +SKIP
        >>> Image.open(io.BytesIO(images[url])).size  # doctest: +SKIP
        (640, 480)
    """
    import aiohttp

    first: dict[str, str] = {}  # url -> the name of its first use
    for url, name in zip(urls, names, strict=True):
        first.setdefault(url, name)
    if not first:
        return {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), trust_env=True) as session:
        tasks = {
            url: asyncio.ensure_future(fetch_image(session, url, limits, name)) for url, name in first.items()
        }
        try:
            await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
        finally:  # the others are of no use once one failed (or the caller went away)
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        failed = [t for t in tasks.values() if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        return {url: task.result() for url, task in tasks.items()}


async def fetch_image(session: Any, url: str, limits: ImageLimits, param: str) -> bytes:
    """One URL's bytes through an ``aiohttp.ClientSession`` (see the module for the limits)."""
    import aiohttp

    try:
        return await asyncio.wait_for(_follow(session, url, limits, param), limits.fetch_timeout_s)
    except InvalidImageError:
        raise
    except asyncio.TimeoutError:
        raise InvalidImageError(
            f"{param}: fetching {_shown(url)} took longer than {limits.fetch_timeout_s:g} s", param=param
        ) from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:  # unreachable, reset, a malformed URL or reply
        why = str(exc) or type(exc).__name__
        raise InvalidImageError(f"{param}: cannot fetch {_shown(url)} ({why})", param=param) from None


async def _follow(session: Any, url: str, limits: ImageLimits, param: str) -> bytes:
    for _ in range(limits.max_redirects + 1):
        check_url(url, limits, param)
        async with session.get(url, allow_redirects=False) as response:
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise InvalidImageError(f"{param}: {_shown(url)} redirects nowhere", param=param)
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise InvalidImageError(
                    f"{param}: fetching {_shown(url)} returned HTTP {response.status}", param=param
                )
            return await _read(response, limits.max_image_bytes, param)
    raise InvalidImageError(
        f"{param}: more than {limits.max_redirects} redirects fetching the image", param=param
    )


async def _read(response: Any, max_bytes: int, param: str) -> bytes:
    """The body, or a 400 as soon as it is longer than ``max_bytes`` (whatever ``Content-Length`` says)."""
    too_large = InvalidImageError(f"{param}: the image is over the limit of {max_bytes} bytes", param=param)
    if response.content_length is not None and response.content_length > max_bytes:
        raise too_large
    data = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK):
        data += chunk
        if len(data) > max_bytes:
            raise too_large
    return bytes(data)


def check_url(url: str, limits: ImageLimits, param: str) -> None:
    """An ``http(s)`` URL on an allowed host, or :class:`InvalidImageError` (checked again at every redirect).

    >>> check_url("file:///etc/passwd", ImageLimits(), "image_data")
    Traceback (most recent call last):
    ...
    sgl_ray.multimodal.inputs.InvalidImageError: image_data: only http(s) image URLs are fetched, not file:
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidImageError(
            f"{param}: only http(s) image URLs are fetched, not {parts.scheme or '(no scheme)'}:", param=param
        )
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidImageError(f"{param}: the image URL {_shown(url)} has no host", param=param)
    allowed = limits.allowed_media_domains
    if allowed is not None and host not in allowed:
        raise InvalidImageError(
            f"{param}: images are not fetched from {host} (the server's allowed_media_domains)", param=param
        )


def fetch_image_blocking(url: str, limits: ImageLimits, param: str) -> bytes:
    """:func:`fetch_images` of one URL for a synchronous caller (the in-process ``Engine``): on this thread, or
    on a helper thread when this one already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fetch_images([url], [param], limits))[url]
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["data"] = asyncio.run(fetch_images([url], [param], limits))[url]
        except BaseException as exc:  # re-raised on the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, name="sgl-ray-image-fetch", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["data"]


def _shown(url: str, limit: int = 120) -> str:
    """The URL as errors show it: without its query and credentials, shortened."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        shown = f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"
    except ValueError:  # a malformed host or port
        shown = url.split("?", 1)[0]
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
