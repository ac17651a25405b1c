"""Per-request context as ASGI middleware: request id, access log, HTTP metrics, last-resort 500.

request ─ X-Request-ID (the client's if it is a sane token, else a fresh one)
        ─ app ─ response + X-Request-ID ─ access log line ─ http_requests_total
        ├ client disconnected (ClientDisconnect while reading the body) ─ nothing to answer:
        │                      access log line only (status 499, client_disconnect: true, no
        │                      traceback) ─ counted as 499, not a 5xx
        └ unhandled exception ─ logged with its traceback and the request id
                              ─ client gets {"error": "internal server error ..."} only
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.requests import ClientDisconnect

from splitexit_server.limits import ASGIApp, Message, Receive, Scope, Send
from splitexit_server.logs import request_id_var
from splitexit_server.metrics import ServerMetrics

log = logging.getLogger("server.access")
errors = logging.getLogger("server.error")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client closed the connection first"


def request_id_from(scope: Scope) -> str:
    """The client's X-Request-ID if it is a short printable token, else a new uuid4 hex."""
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if _SANE_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Tag each request with an id, echo it, log and count the request, contain crashes."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope)
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = 500
        started = False
        header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # e.g. a device that gave up at its deadline: nobody to answer
            status = CLIENT_CLOSED_REQUEST
        except Exception:
            errors.exception("unhandled error", extra={"path": scope.get("path")})
            if not started:
                body = json.dumps(
                    {"error": f"internal server error (request id {rid}); see the server log"}
                ).encode()
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send_with_id({"type": "http.response.body", "body": body})
            status = 500
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "GET")
            method = method if method in _METHODS else "OTHER"
            self.metrics.http_requests.inc(route=route, method=method, code=status)
            if log.isEnabledFor(logging.INFO):
                extra = {
                    "request_id": rid,
                    "method": method,
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    "client": (scope.get("client") or ("", 0))[0],
                }
                if status == CLIENT_CLOSED_REQUEST:
                    extra["client_disconnect"] = True
                log.info("request", extra=extra)
            request_id_var.reset(token)
