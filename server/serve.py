"""Run the app under uvicorn with a graceful, two-step shutdown.

SIGTERM ─ drain: /v2/health/ready 503, new inferences 503 (for `drain_s`, so load
          balancers stop routing here); streams answer what is in flight and close with
          4503 (waited for up to `graceful_timeout_s`) ─ close the listener ─ in-flight
          requests finish (up to `graceful_timeout_s`) ─ batchers stop ─ exit
a second SIGINT/SIGTERM skips the wait
"""

from __future__ import annotations

import socket
import time
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI

from splitexit_server.admission import AdmissionDoor
from splitexit_server.connection import guarded_protocol
from splitexit_server.logs import uvicorn_log_config
from splitexit_server.settings import Settings
from splitexit_server.state import ServerState


class GracefulServer(uvicorn.Server):
    """`uvicorn.Server` that drains (readiness 503, new requests 503) before stopping."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_s: float = 0.0) -> None:
        super().__init__(config)
        self.state = state
        self.drain_s = drain_s
        self._stop_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain, then stop after `drain_s`. Another one: stop now."""
        if self._stop_at is None and not self.should_exit:
            self.state.begin_drain()
            self._stop_at = time.monotonic() + self.drain_s
            if self.drain_s > 0 or self.state.open_streams:
                self._captured_signals.append(sig)  # uvicorn re-raises it after shutdown
                return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        now = time.monotonic()
        if self._stop_at is not None and now >= self._stop_at:
            streams_done = not self.state.open_streams
            if streams_done or now >= self._stop_at + (self.config.timeout_graceful_shutdown or 0):
                self.should_exit = True
        return await super().on_tick(counter)


def make_server(
    app: FastAPI, settings: Settings, *, log_config: dict[str, Any] | Literal[True] | None = True
) -> GracefulServer:
    """A GracefulServer for `app` on settings.host:settings.port (JSON logs by default)."""
    protocol = guarded_protocol(  # 408 for a header that never completes; 429 before any task
        settings.client_timeout_s,
        settings.http_parser,
        door=AdmissionDoor(app, app.state.splitexit).refusal,
    )
    protocol.timed_out = app.state.splitexit.metrics.header_timed_out  # type: ignore[attr-defined]
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=uvicorn_log_config(settings.log_level) if log_config is True else log_config,
        log_level=settings.log_level,
        access_log=False,  # RequestContextMiddleware logs each request, with its id
        # uvicorn annotates an int but waits with it as a timeout: fractions are kept
        timeout_graceful_shutdown=settings.graceful_timeout_s,  # type: ignore[arg-type]
        server_header=False,  # bytes on every response, for nobody
        date_header=False,  # likewise; answers are never cached (RFC 9110 asks for Date)
        lifespan="on",
        http=protocol,
        ws_max_size=settings.max_body_bytes,  # a stream message is bounded like a body
        ws_per_message_deflate=False,  # payloads are compressed already
    )
    return GracefulServer(config, app.state.splitexit, drain_s=settings.drain_s)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port), for servers run in tests."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
