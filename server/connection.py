"""Connections that cannot be held hostage: a header must arrive in time, and an upload
refused before its body was read is not read (its connection closes).

    connection ─ first byte of a request ─ header complete within client_timeout_s?
               │                          └ no: 408 + Connection: close (slow-header clients)
               ├ (httptools) the bytes read are one whole plain POST and the admission door
               │   refuses it: its 429 written from those bytes, never parsed into a request
               │   (`whole_post`: the cheapest refusal there is, for overload)
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
import re
from collections.abc import Callable
from typing import Any

from splitexit_server.limits import ASGIApp, Message, Receive, Scope, Send

DRAIN_BYTES = 64 * 1024  # the most of an unread body uvicorn reads and drops (keep-alive)
Door = Callable[[str], "bytes | None"]  # the whole response refusing a POST to this path, or None

# what `whole_post` leaves to the real parser: control bytes (a bare CR or LF, a folded line
# are counted), headers that change how the request is framed or answered
_CONTROL = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_FRAMING = re.compile(rb"\r\n(?:transfer-encoding|connection|expect|upgrade)")
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,9})[ \t]*\r\n")


class _HeaderDeadline(asyncio.Protocol):
    """Mixed into a uvicorn HTTP protocol (h11 or httptools: both keep `cycle`, `loop` and
    `transport`): a deadline for each request's header; with httptools, the door's refusals
    written without an ASGI task, or without parsing at all."""

    header_timeout_s = 5.0
    door: Door | None = None
    whole_requests = False  # refuse whole POSTs from their bytes (httptools)
    _header_timer: asyncio.TimerHandle | None = None
    _between = True  # the parser is between two requests (httptools)
    _refused_at = 0.0  # loop time of the last refusal written from a request's bytes
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    timed_out: Callable[[], None] | None = None  # called after each 408 written here (metrics)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        idle = cycle is None or cycle.response_complete
        if idle and self.whole_requests and self._between and self._refuse_whole(data):
            return
        if idle:  # these bytes begin a request's header
            self._arm()
        super().data_received(data)
        if self.cycle is not cycle:  # the header is complete: the app's deadlines take over
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._between = False
        super().on_message_begin()  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self._between = True
        super().on_message_complete()  # type: ignore[misc]

    def _refuse_whole(self, data: bytes) -> bool:
        """Answer `data` with the door's 429 if it is one whole plain POST the door refuses
        (nothing parsed, nothing built: what the parser would do for it is already done);
        False leaves it to the parser. The connection stays open for the next request."""
        assert self.door is not None
        path = whole_post(data)
        if path is None or self.pipeline:  # type: ignore[attr-defined]
            return False
        refusal = self.door(path)
        if refusal is None:
            return False
        self._disarm()
        self.transport.write(refusal)
        self.server_state.total_requests += 1  # type: ignore[attr-defined]
        self._refused_at = self.loop.time()
        if self.timeout_keep_alive_task is None:  # type: ignore[has-type]  # uvicorn sets it untyped
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive,  # type: ignore[attr-defined]
                self.timeout_keep_alive_handler,
            )
        return True

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn's keep-alive timeout, counted from the last refusal written from bytes
        when that came later than the last answer (those do not re-arm the timer)."""
        idle = self.loop.time() - self._refused_at
        left = self.timeout_keep_alive - idle  # type: ignore[attr-defined]
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(
                left, self.timeout_keep_alive_handler
            )
            return
        super().timeout_keep_alive_handler()  # type: ignore[misc]

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """httptools: a request the door refuses is answered here, with no ASGI task at all;
        the rest of its body is then dropped by the parser's callbacks, as after any complete
        response (the connection closes when that rest is too big to drop)."""
        scope = cycle.scope
        door = self.door if scope["method"] == "POST" else None
        refusal = door(scope["path"]) if door is not None else None
        if refusal is None:
            super()._start_asgi_task(cycle, app)  # type: ignore[misc]
            return
        cycle.response_complete = True
        if close_unread(scope, 0) or not cycle.keep_alive:
            self.transport.write(refusal.replace(b"\r\n", b"\r\nconnection: close\r\n", 1))
            self.transport.close()
            return
        self.transport.write(refusal)
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
    door: Door | None = None,
) -> type[asyncio.Protocol]:
    """The uvicorn `http` protocol class that answers 408 to a header slower than this.

    `parser`: "httptools" (C, the `server` extra), "h11" (pure Python), or "auto": httptools
    when installed, else h11. `door` (httptools only: h11 starts its task itself) gives the
    response refusing a POST before it is parsed or its ASGI task starts
    (`AdmissionDoor.refusal`).
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
    whole = door is not None and base.__name__ == "HttpToolsProtocol"
    attrs = {"header_timeout_s": header_timeout_s, "door": door, "whole_requests": whole}
    return type(name, (_HeaderDeadline, base), attrs)


def whole_post(data: bytes) -> str | None:
    """The path of the request in `data` if `data` is exactly one whole, plain HTTP/1.1 POST
    (a path without query or escapes, a Content-Length body all there, no header that
    changes its framing or answer, nothing unusual for a parser to judge), else None.

    A device's request usually arrives in one read; this is what lets the door refuse it
    without parsing it into a request. Anything else goes to the parser, as always.
    """
    if not data.startswith(b"POST /"):
        return None
    line_end = data.find(b"\r\n")
    head_end = data.find(b"\r\n\r\n")
    if line_end < 0 or head_end < 0:
        return None
    parts = data[5:line_end].split(b" ")
    if len(parts) != 2 or parts[1] != b"HTTP/1.1" or not parts[0].isascii():
        return None
    path, raw = parts[0], data[: head_end + 2]
    if b"%" in path or b"?" in path or b"#" in path:
        return None
    lines = raw.count(b"\r\n")
    if raw.count(b"\r") != lines or raw.count(b"\n") != lines or b"\n " in raw or b"\n\t" in raw:
        return None  # a bare CR or LF, a folded header line
    if len(raw.translate(None, _CONTROL)) != len(raw):
        return None
    head = raw[line_end:].lower()  # \r\nname: value ... \r\n
    if _FRAMING.search(head) or head.count(b"\r\ncontent-length") != 1:
        return None
    length = _LENGTH.search(head)
    if length is None or len(data) != head_end + 4 + int(length.group(1)):
        return None
    return path.decode("ascii")


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
