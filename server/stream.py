"""The stream endpoint: `/v2/models/{name}/stream`, one WebSocket per device and model.

    upgrade ─ bearer token (401) ─ subprotocol splitexit.stream.v1 (400) ─ accept
            ─ handshake: model (4404), ready (4503), fingerprint (4409), code shape and
              options (4400) ─ accepted {window, classes, max_message_bytes}
    message ─ read_message (no id: close 4400; bad: "rejected") ─ draining, window or queue
              full ("busy") ─ model.prepare ─ the model's batcher (with HTTP requests and
              other devices' messages) ─ answer (id, class, probability) or an error
    drain   ─ new messages "busy", messages in flight answered, then close 4503
              (the device reconnects: another replica, or this one once it is back)

The messages share everything with `POST .../infer` past the parsing: the frame checks
(`ServedModel.prepare`), the batcher and its limits, the metrics (counted under
`splitexit_inference_requests_total` with the same outcomes) and JSON logs, whose
`request_id` is `<connection>-<message id>`. The layout is `splitexit.protocol.stream`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from splitexit.errors import FingerprintMismatch, FrameError
from splitexit.protocol.kserve import INPUT_FRAME
from splitexit.protocol.stream import (
    CLOSE_DRAINING,
    CLOSE_FINGERPRINT,
    CLOSE_NOT_FOUND,
    CLOSE_PROTOCOL,
    MAX_WINDOW,
    STREAM_VERSION,
    SUBPROTOCOL,
    Accepted,
    Failure,
    MessageError,
    Session,
    StreamError,
    encode_answer,
    encode_failure,
    read_message,
)
from splitexit_server.auth import AUTH_HINT, bearer_ok
from splitexit_server.batcher import Expired, QueueFull, Stopped
from splitexit_server.errors import BadRequest, DeadlineExceeded, Overloaded
from splitexit_server.metrics import Gauge
from splitexit_server.model import Answer, ServedModel
from splitexit_server.state import ServerState

log = logging.getLogger("server.stream")

STREAM_PATH = "/v2/models/{name}/stream"
_SEND_ERRORS = (WebSocketDisconnect, WebSocketDisconnected, RuntimeError, OSError)


def add_stream_route(app: FastAPI, state: ServerState, token: bytes | None) -> None:
    """Serve the stream of every model of `state` on `app` (bearer `token`, if any)."""
    hub = _Hub(state, token)
    state.drain_hooks.append(hub.drain)

    @app.websocket(STREAM_PATH)
    async def stream(websocket: WebSocket, name: str) -> None:
        await hub.serve(websocket, name)


def offer(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """Model metadata that tells a device the stream is there (`parameters.stream`)."""
    params = dict(meta.get("parameters") or {})
    params["stream"] = {"path": STREAM_PATH.format(name=name), "version": STREAM_VERSION}
    return {**meta, "parameters": params}


class _Hub:
    """The open streams: counted (metrics, state.open_streams) and drained together."""

    def __init__(self, state: ServerState, token: bytes | None) -> None:
        self.state = state
        self.token = token
        self.streams: set[_Stream] = set()
        self.numbers = itertools.count(1)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gauge = Gauge(
            "splitexit_stream_connections", "open stream connections by model", ("model",),
            registry=state.metrics.registry,
        )  # fmt: skip

    def count(self, name: str) -> None:
        """Show the open streams of model `name` in the gauge."""

        def opened() -> float:
            return float(sum(s.name == name and s.model is not None for s in self.streams))

        self.gauge.set_function(opened, model=name)

    def drain(self) -> None:
        """Called when the server starts draining (maybe from a signal handler)."""
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is open
                self.loop.call_soon_threadsafe(self._drain_all)

    def _drain_all(self) -> None:
        for s in list(self.streams):
            s.begin_drain()

    async def serve(self, ws: WebSocket, name: str) -> None:
        self.loop = asyncio.get_running_loop()
        if not bearer_ok(ws.headers.get("authorization"), self.token):
            headers = {"WWW-Authenticate": 'Bearer realm="splitexit"'}
            await ws.send_denial_response(JSONResponse({"error": AUTH_HINT}, 401, headers))
            return
        if SUBPROTOCOL not in ws.scope.get("subprotocols", ()):
            error = f"a stream speaks the WebSocket subprotocol {SUBPROTOCOL!r}; offer it"
            await ws.send_denial_response(JSONResponse({"error": error}, 400))
            return
        await ws.accept(subprotocol=SUBPROTOCOL)
        stream = _Stream(self, ws, name, next(self.numbers))
        self.streams.add(stream)
        self.state.open_streams += 1
        try:
            await stream.run()
        finally:
            self.streams.discard(stream)
            self.state.open_streams -= 1


class _Stream:
    """One connection: its session, its messages in flight, its drain."""

    def __init__(self, hub: _Hub, ws: WebSocket, name: str, number: int) -> None:
        self.hub = hub
        self.state = hub.state
        self.settings = hub.state.settings
        self.ws = ws
        self.name = name
        self.number = number
        self.session: Session | None = None
        self.model: ServedModel | None = None
        self.classes = 0
        self.inflight: dict[int, asyncio.Task[None]] = {}
        self.draining = False
        self.closed = False
        self._closing: asyncio.Task[None] | None = None
        self.messages = 0

    # --------------------------------------------------------------------- connection

    async def run(self) -> None:
        peer = self.ws.client.host if self.ws.client else None
        extra = {"model": self.name, "stream": self.number, "peer": peer}
        try:
            if not await self._handshake():
                return
            assert self.model is not None
            self.hub.count(self.name)
            log.info("stream open", extra=extra)
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data is None:
                    await self.close(CLOSE_PROTOCOL, "a text message after the handshake")
                    break
                self.messages += 1
                try:
                    await self._on_message(data)
                except Exception:  # a bug: this connection ends, the server goes on
                    log.exception("stream message failed", extra=extra)
                    await self.close(1011, "internal server error")
                if self.closed:
                    break
        finally:
            for task in self.inflight.values():
                task.cancel()
            if self.inflight:
                await asyncio.gather(*self.inflight.values(), return_exceptions=True)
            log.info("stream closed", extra={**extra, "messages": self.messages})

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(*_SEND_ERRORS):
                await self.ws.close(code, reason[:120])

    def begin_drain(self) -> None:
        """Answer what is in flight, then close with 4503; new messages get "busy"."""
        self.draining = True
        if not self.inflight:
            self._closing = asyncio.get_running_loop().create_task(
                self.close(CLOSE_DRAINING, "draining")
            )

    async def _refuse(self, code: int, text: str) -> bool:
        failure = Failure(None, "busy" if code == CLOSE_DRAINING else "rejected", text)
        with contextlib.suppress(*_SEND_ERRORS):
            await self.ws.send_text(encode_failure(failure))
        await self.close(code, text)
        log.info("stream refused", extra={"model": self.name, "code": code, "reason": text})
        return False

    async def _handshake(self) -> bool:
        """Read the session; True once accepted (else the connection is closed)."""
        try:
            message = await asyncio.wait_for(self.ws.receive(), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            return await self._refuse(CLOSE_PROTOCOL, "no handshake came in time")
        if message["type"] == "websocket.disconnect":
            return False
        raw = message.get("text") or message.get("bytes") or b""
        try:
            session = Session.decode(raw)
        except StreamError as e:
            return await self._refuse(CLOSE_PROTOCOL, str(e))
        if session.model != self.name:
            return await self._refuse(
                CLOSE_PROTOCOL,
                f"the handshake names model {session.model!r}, the URL {self.name!r}",
            )
        model = self.state.models.get(self.name)
        if model is None and self.name not in self.state.names:
            return await self._refuse(
                CLOSE_NOT_FOUND,
                f"no model named {self.name!r}; this server serves {self.state.names}",
            )
        if model is None or not model.ready or self.state.draining:
            return await self._refuse(
                CLOSE_DRAINING, "not ready (loading or draining): retry later"
            )
        if not model.fingerprint.startswith(session.fingerprint):
            mismatch = FingerprintMismatch(session.fingerprint, model.fingerprint)
            return await self._refuse(CLOSE_FINGERPRINT, str(mismatch))
        problem = self._misfit(session, model)
        if problem is not None:
            return await self._refuse(CLOSE_PROTOCOL, problem)
        self.session, self.model = session, model
        self.classes = len(model.manifest.class_names)
        window = min(self.settings.stream_window, MAX_WINDOW)
        size = session.max_message_bytes
        with contextlib.suppress(*_SEND_ERRORS):
            await self.ws.send_text(Accepted(window, self.classes, size).encode())
            return True
        return False

    def _misfit(self, session: Session, model: ServedModel) -> str | None:
        b = model.manifest.bottleneck
        if session.code_shape != tuple(b.code_shape):
            return f"code shape {list(session.code_shape)}; model {self.name!r} has {b.code_shape}"
        bad = [list(p) for p in session.points if p[1] not in b.bits]
        if bad:
            return f"points {bad} use bits model {self.name!r} lacks (it has {list(b.bits)})"
        if session.samples > self.settings.max_batch_size:
            return (
                f"{session.samples} samples a message; the most is {self.settings.max_batch_size}"
            )
        if session.dictionary and model.bundle.dictionary is None:
            return f"model {self.name!r} has no zstd dictionary; send without one"
        if session.top_k > len(model.manifest.class_names):
            return f"top_k {session.top_k} exceeds the model's {self.classes} classes"
        return None

    # ----------------------------------------------------------------------- messages

    async def _on_message(self, data: bytes) -> None:
        """Validate and queue one message (its answer comes from a task), or answer now."""
        assert self.session is not None and self.model is not None
        model, settings, metrics = self.model, self.settings, self.state.metrics
        start = time.perf_counter()
        metrics.received_bytes.inc(len(data), model=model.name)
        try:
            mid, frame = read_message(data, self.session, max_raw_bytes=model.max_raw_bytes)
        except MessageError as e:
            await self._fail(e.message_id, "rejected", f"bad message: {e}", start)
            return
        except StreamError as e:
            await self.close(CLOSE_PROTOCOL, str(e))
            return
        if mid in self.inflight:
            await self.close(CLOSE_PROTOCOL, f"message id {mid} is already in flight")
            return
        if self.draining or self.state.draining:
            await self._busy(mid, "the server is shutting down; reconnect", start, "not_ready")
            return
        if len(self.inflight) >= min(settings.stream_window, MAX_WINDOW):
            await self._busy(mid, "the connection's window is full", start)
            return
        deadline = time.monotonic() + settings.request_timeout_s
        if self.session.timeout_ms is not None:
            deadline = min(deadline, time.monotonic() + self.session.timeout_ms / 1e3)
        try:
            work = model.prepare(INPUT_FRAME, [frame], header_sent=False)
            job = model.batcher.submit(work, size=work.samples, deadline=deadline)
        except FrameError as e:
            await self._fail(mid, "rejected", f"bad frame: {e}", start)
            return
        except QueueFull as e:
            await self._busy(mid, str(e), start)
            return
        except Stopped:
            await self._busy(mid, "the server is shutting down; reconnect", start, "not_ready")
            return
        self.inflight[mid] = asyncio.get_running_loop().create_task(
            self._answer(mid, job.future, deadline, start)
        )

    async def _answer(
        self, mid: int, future: asyncio.Future, deadline: float, start: float
    ) -> None:
        assert self.session is not None and self.model is not None
        try:
            try:
                answer: Answer = await asyncio.wait_for(future, deadline - time.monotonic())
            except (asyncio.TimeoutError, Expired, DeadlineExceeded):
                await self._fail(mid, "deadline", "no answer within the deadline", start, "timeout")
                return
            except Overloaded as e:  # admission control dropped it uncomputed: busy, not a fault
                await self._busy(mid, str(e), start)
                return
            except Stopped:
                await self._busy(mid, "the server is shutting down; reconnect", start, "not_ready")
                return
            except (FrameError, BadRequest) as e:
                await self._fail(mid, "rejected", f"bad frame: {e}", start)
                return
            except asyncio.CancelledError:
                self._count("client_disconnect", start, observe=False)
                raise
            except Exception:
                log.exception("message failed", extra={"request_id": self._rid(mid)})
                await self._fail(mid, "server_error", "internal server error", start, "error")
                return
            data = encode_answer(
                mid,
                self.session,
                self.classes,
                answer.prediction,
                answer.probability,
                answer.logits,
                compute_s=answer.compute_s,
                server_s=time.perf_counter() - start,
            )
            with contextlib.suppress(*_SEND_ERRORS):
                await self.ws.send_bytes(data)
            self._count("success", start)
            log.debug("answered", extra={"request_id": self._rid(mid)})
        finally:
            self.inflight.pop(mid, None)
            if self.draining and not self.inflight:
                await self.close(CLOSE_DRAINING, "draining")

    async def _busy(self, mid: int, text: str, start: float, outcome: str = "overloaded") -> None:
        retry = float(self.settings.retry_after_s)
        await self._send_failure(Failure(mid, "busy", text, retry), start, outcome)

    async def _fail(
        self, mid: int, code: str, text: str, start: float, outcome: str = "bad_request"
    ) -> None:
        await self._send_failure(Failure(mid, code, text), start, outcome)

    async def _send_failure(self, failure: Failure, start: float, outcome: str) -> None:
        with contextlib.suppress(*_SEND_ERRORS):
            await self.ws.send_text(encode_failure(failure))
        self._count(outcome, start)
        extra = {"request_id": self._rid(failure.id), "outcome": outcome}
        log.info(f"message not answered: {failure.message}", extra=extra)

    def _count(self, outcome: str, start: float, observe: bool = True) -> None:
        metrics = self.state.metrics
        metrics.requests.inc(model=self.name, outcome=outcome)
        if observe:
            metrics.request_duration.observe(time.perf_counter() - start, model=self.name)

    def _rid(self, mid: int | None) -> str:
        return f"stream{self.number}-{mid}"
