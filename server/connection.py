"""Connections that cannot be held hostage: a header must arrive in time, and an upload
refused before its body was read is not read (its connection closes).

    connection ─ first byte of a request ─ header complete within client_timeout_s?
               │                          └ no: 408 + Connection: close (slow-header clients)
               ├ header complete, the admission door refuses (httptools): 429 written here
               │   before any ASGI task exists
               └ request ─ app answers before the body is all in (401, 413, 429, 408 ...)
                         ─ not a 408, the rest announced and small (DRAIN_BYTES)? uvicorn reads
                         │ and drops it: keep-alive
                         └ otherwise: Connection: close (the upload is not read and discarded)

`guarded_protocol(timeout)` is the uvicorn HTTP protocol with the header timeout (uvicorn's own
keep-alive timeout covers idle connections only once a request was answered, and is reset by
every byte, so a header trickled a byte at a time would hold a connection forever).
`CloseUnreadBodies` is ASGI middleware. The body's own deadline (408 when it stops short or
stalls) is the app's (`splitexit_server.app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from splitexit_server.limits import ASGIApp, Message, Receive, Scope, Send

DRAIN_BYTES = 64 * 1024  # the most of an unread body uvicorn reads and drops (keep-alive)


class _HeaderDeadline(asyncio.Protocol):
    """Mixed into a uvicorn HTTP protocol (h11 or httptools: both keep `cycle`, `loop` and
    `transport`): a deadline for each request's header."""

    header_timeout_s = 5.0
    door: Callable[[Scope], bytes | None] | None = None  # a refusal to write, or None
    _header_timer: asyncio.TimerHandle | None = None
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    timed_out: Callable[[], None] | None = None  # called after each 408 written here (metrics)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # these bytes begin a request's header
            self._arm()
        super().data_received(data)
        if self.cycle is not cycle:  # the header is complete: the app's deadlines take over
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """httptools: a request the door refuses is answered here, with no ASGI task at all
        (the cheapest refusal there is); the rest of its body is then dropped by the parser's
        callbacks, as after any complete response."""
        refusal = self.door(cycle.scope) if self.door is not None else None
        if refusal is None:
            super()._start_asgi_task(cycle, app)  # type: ignore[misc]
            return
        cycle.response_complete = True
        self.transport.write(refusal)
        if not cycle.keep_alive or b"\r\nconnection: close\r\n" in refusal:
            self.transport.close()
            return
        self.on_response_complete()  # type: ignore[attr-defined]

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle and not self.cycle.response_complete):
            return
        body = json.dumps(
            {
                "error": f"the request header did not arrive within {self.header_timeout_s:g} s "
                "(setting client_timeout_s)"
            }
        ).encode()
        head = (
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()
        if self.timed_out is not None:
            self.timed_out()


def guarded_protocol(
    header_timeout_s: float,
    parser: str = "auto",
    door: Callable[[Scope], bytes | None] | None = None,
) -> type[asyncio.Protocol]:
    """The uvicorn `http` protocol class that answers 408 to a header slower than this.

    `parser`: "httptools" (C, the `server` extra), "h11" (pure Python), or "auto": httptools
    when installed, else h11. `door` (httptools only: h11 starts its task itself) gives the
    response refusing a request before its ASGI task starts (`AdmissionDoor.refusal`).
    """
    base: type[asyncio.Protocol]
    if parser not in ("auto", "h11", "httptools"):
        raise ValueError(f"parser must be auto, h11 or httptools, got {parser!r}")
    try:
        if parser == "h11":
            raise ImportError
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        if parser == "httptools":
            raise
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    name = f"HeaderDeadline{base.__name__}"
    attrs = {"header_timeout_s": header_timeout_s, "door": door}
    return type(name, (_HeaderDeadline, base), attrs)


class CloseUnreadBodies:
    """Close the connection of a request answered before its body was read, unless the rest
    is small and announced (then uvicorn reads it and throws it away, keeping the connection:
    cheaper for a device than a new one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        done = not _has_body(scope)
        read = 0

        async def tracking_receive() -> Message:
            nonlocal done, read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                done = not message.get("more_body", False)
            else:  # http.disconnect
                done = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not done:
                stalled = message["status"] == 408  # the rest is not coming
                if stalled or close_unread(scope, read):
                    message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        await self.app(scope, tracking_receive, closing_send)


_CLOSE = (b"connection", b"close")


def close_unread(scope: Scope, read: int) -> bool:
    """Whether a request answered after reading `read` bytes of its body should close its
    connection: it has a body, and the rest is not announced or over DRAIN_BYTES."""
    if not _has_body(scope):
        return False
    length = _declared_length(scope)
    return length is None or length - read > DRAIN_BYTES


def _has_body(scope: Scope) -> bool:
    """Whether the request has a body still to read (RFC 9112: announced by its headers)."""
    headers = dict(scope.get("headers", []))
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0").strip() != b"0"


def _declared_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
            return None
    return None
