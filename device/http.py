"""The HTTP plumbing under `OffloadClient`: httpcore's keep-alive pool, one bounded exchange.

    httpx.Request ─ httpx.AsyncHTTPTransport (httpcore: pooled HTTP/1.1 over h11, TLS)
        ─ fetch: the whole exchange within the `read` timeout, the body within
          `max_body_bytes` ─ httpx.Response (body read)

No parser of our own: httpcore speaks HTTP/1.1 (every body framing, informational answers,
connections the server closed while idle noticed before reuse). What this module adds is
what the device needs on top: `fetch` bounds the whole answer by the `read` timeout (a
server trickling its answer cannot stretch it) and its size by `max_body_bytes`;
`http_transport` keeps idle connections shorter than uvicorn does (4 s against 5 s), sets
TCP_NODELAY, makes no retries of its own (the client's loop is the only one) and checks TLS
certificates against the system's store (`SSL_CERT_FILE` honoured), no proxies.
`within` is an asyncio timeout for Python 3.10 and later.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar, cast

import httpx

T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
KEEPALIVE_S = 4.0  # under uvicorn's 5 s, so the client closes an idle connection first


if sys.version_info >= (3, 11):

    async def within(seconds: float | None, aw: Awaitable[T]) -> T:
        """`await aw`, raising TimeoutError after `seconds` (None: no limit)."""
        async with asyncio.timeout(seconds):
            return await aw

else:  # pragma: no cover - Python 3.10

    async def within(seconds: float | None, aw: Awaitable[T]) -> T:
        """`await aw`, raising TimeoutError after `seconds` (None: no limit)."""
        try:
            return await asyncio.wait_for(aw, seconds)
        except asyncio.TimeoutError as e:
            raise TimeoutError from e


def http_transport(
    max_connections: int = 8, *, ssl_context: ssl.SSLContext | None = None
) -> httpx.AsyncHTTPTransport:
    """The keep-alive transport to one tail server (see the module docstring)."""
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    return httpx.AsyncHTTPTransport(
        verify=ssl_context or ssl.create_default_context(),
        trust_env=False,
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_S,
        ),
        retries=0,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )


async def fetch(
    transport: httpx.AsyncBaseTransport,
    request: httpx.Request,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> httpx.Response:
    """Send `request` and read its whole answer within the request's `read` timeout (no
    redirects, no auth: what `httpx.AsyncClient.send` adds is not needed here). Raises
    httpx's errors; an answer over `max_body_bytes` is a `RemoteProtocolError`."""
    read_s = request.extensions.get("timeout", {}).get("read")
    try:
        return await within(read_s, _exchange(transport, request, max_body_bytes))
    except TimeoutError as e:
        raise httpx.ReadTimeout(f"no complete answer within {read_s} s", request=request) from e


async def _exchange(
    transport: httpx.AsyncBaseTransport, request: httpx.Request, max_body_bytes: int
) -> httpx.Response:
    response = await transport.handle_async_request(request)
    response.request = request  # as httpx.AsyncClient.send does
    try:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise httpx.RemoteProtocolError(
                f"the answer's body is {declared} bytes, over {max_body_bytes} bytes",
                request=request,
            )
        stream = cast(httpx.AsyncByteStream, response.stream)  # an AsyncClient's response
        response.stream = _Bounded(stream, max_body_bytes, request)
        await response.aread()
    finally:
        await response.aclose()
    return response


class _Bounded(httpx.AsyncByteStream):
    """A response body that raises once it passes `limit` bytes."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int, request: httpx.Request):
        self.inner, self.limit, self.request = inner, limit, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self.inner:
            size += len(chunk)
            if size > self.limit:
                raise httpx.RemoteProtocolError(
                    f"the answer's body is over {self.limit} bytes", request=self.request
                )
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


def timeouts(total_s: float, connect_s: float | None = None) -> dict[str, float]:
    """The `timeout` extension of a request: `total_s` for each phase, connecting within
    `connect_s` (default: `total_s`)."""
    connect = total_s if connect_s is None else min(connect_s, total_s)
    return {"connect": connect, "read": total_s, "write": total_s, "pool": total_s}
