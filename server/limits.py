"""Request body limit as ASGI middleware (413), on `Content-Length` and on the streamed bytes.

    request ─ Content-Length > limit? ── 413 at once, body never read
            └ receive() wrapper counts the bytes as they stream in (chunked bodies too)
              ─ more than limit? ── PayloadTooLarge raised into the reader ─► 413

The app's handlers see `PayloadTooLarge` (a ServerError) while reading and answer it like
any other error; if one escapes a handler, this middleware answers 413 itself.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from splitexit_server.errors import BadRequest, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def too_large(limit: int, size: int | None = None) -> PayloadTooLarge:
    said = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return PayloadTooLarge(
        f"request body is {said}; this server accepts at most {limit} bytes "
        "(setting max_body_bytes)"
    )


class BodyLimitMiddleware:
    """Refuse request bodies over `max_body_bytes` with 413, whether announced or streamed."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        try:
            declared = _content_length(scope)
        except BadRequest as e:
            await _send_error(send, e.status, e.message)
            return
        if declared is not None and declared > limit:
            await _send_error(send, 413, too_large(limit, declared).message)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as e:
            if started:
                raise
            await _send_error(send, 413, e.message)


def _content_length(scope: Scope) -> int | None:
    values = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
    if not values:
        return None
    text = values[0].decode("latin-1").strip()
    if len(values) > 1 or not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest(f"invalid Content-Length {text!r}")
    return int(text)


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
