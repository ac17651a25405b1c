"""The stream client: frames over one WebSocket per server and model, KServe HTTP otherwise.

    check_fingerprint ─ HTTP metadata: the fingerprint, and does the server offer a stream?
        └ offered, transport not "http" ─ connect ─ handshake ─┬ accepted ─► stream
                                                               ├ 4409 ─► FingerprintRejected
                                                               └ no stream here (404, 4400,
                                                                 bad upgrade) ─► HTTP
    infer(frame) ─ on the stream? no ─► OffloadClient.infer (KServe v2 over HTTP)
        └ yes ─ attempt (bounded by min(timeout_s, time left)):
                connection (reconnect: backoff with full jitter) ─ an id from the window
                ─ message ─┬ answer ─────────────────────────► InferResult
                           ├ busy / deadline ───────────────► ServerBusy (answer locally)
                           ├ rejected ──────────────────────► RequestRejected
                           ├ connection lost: closed, no pong
                           │ within ping_timeout_s, garbage ─► ServerUnreachable / ServerFailed
                           └ no answer in time ─────────────► OffloadTimeout
                retried like HTTP (same retries, backoff, deadline), on a new connection
                when the old one is gone

Liveness: the client pings every `ping_interval_s`; a server that does not answer within
`ping_timeout_s` (dead, stalled, partitioned) has its connection closed, and every message
in flight on it fails at once, instead of at its own timeout. A message whose attempt timed
out keeps its id until its late answer comes (or the connection goes), so an id is never
reused while the server may still answer it. Bytes are counted as they cross TCP: each
message or answer as one WebSocket frame (2-10 header bytes, a 4-byte mask upstream); the
keepalive pings (10 B up, 6 B down each) are not charged to any offload.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from splitexit.bundle import Bundle
from splitexit.protocol.errors import StreamError
from splitexit.protocol.stream import (
    CLOSE_DRAINING,
    CLOSE_FINGERPRINT,
    CLOSE_NOT_FOUND,
    CLOSE_PROTOCOL,
    CLOSE_UNAUTHORIZED,
    SUBPROTOCOL,
    Accepted,
    Failure,
    Session,
    decode_answer,
    decode_failure,
    message_from_frame,
    session_for,
    websocket_frame_bytes,
)

from .client import _RETRYABLE, Exchange, InferResult, OffloadClient, _Tally
from .config import operating_points
from .errors import (
    FingerprintRejected,
    OffloadError,
    OffloadRefused,
    OffloadTimeout,
    RequestRejected,
    ServerBusy,
    ServerFailed,
    ServerUnreachable,
)
from .http import within

Transport = Literal["auto", "stream", "http"]
TRANSPORTS = ("auto", "stream", "http")


@dataclass(frozen=True)
class StreamConfig:
    """How the client uses the stream (its timeouts and retries are the HTTP client's).

    Args:
        transport: "auto" (the stream when the server offers it, else HTTP), "stream"
            (the stream or nothing), "http" (never the stream).
        ping_interval_s, ping_timeout_s: ping this often; no pong this long: connection dead.
        reconnect_s, reconnect_max_s: after n failed connects in a row, the next waits
            uniform(0, min(max, base * 2**(n-1))).
    """

    transport: Transport = "auto"
    ping_interval_s: float = 1.0
    ping_timeout_s: float = 1.0
    reconnect_s: float = 0.05
    reconnect_max_s: float = 2.0

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        for name in ("ping_interval_s", "ping_timeout_s", "reconnect_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.reconnect_s <= self.reconnect_max_s:
            raise ValueError("need 0 <= reconnect_s <= reconnect_max_s")


def bundle_session(bundle: Bundle, model: str, timeout_s: float | None = None) -> Session:
    """The session a device running `bundle` states: its operating points, codec, shape."""
    m = bundle.manifest
    return session_for(
        model,
        bundle.fingerprint,
        m.bottleneck.code_shape,
        [(p.channels, p.bits) for p in operating_points(bundle)],
        dictionary=m.codec.dictionary is not None,
        timeout_ms=None if timeout_s is None else timeout_s * 1e3,
    )


class _NoStream(Exception):
    """The server (or what is in front of it) does not speak the stream: use HTTP."""


class StreamClient:
    """`OffloadClient`'s interface, offloading over the stream when it can (see module doc).

    `http` is the KServe client used for metadata, probes, and whenever the stream is not;
    `log` gets one line when the transport changes.
    """

    def __init__(
        self,
        http: OffloadClient,
        session: Session,
        config: StreamConfig | None = None,
        *,
        rng: random.Random | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.http = http
        self.session = session
        self.stream_config = config or StreamConfig()
        self.rng = rng or random.Random()
        self.log = log or (lambda message: None)
        self.transport: Literal["stream", "http"] = "http"
        self.reconnects = 0  # connections opened after the first
        self._conn: _Connection | None = None
        self._opening: asyncio.Task[_Connection] | None = None
        self._failures = 0
        self._next_connect = 0.0
        self._opened = 0
        self._sent = self._received = 0
        self._on_http = False

    # ----------------------------------------------------------- OffloadClient's surface

    @property
    def base_url(self) -> str:
        return self.http.base_url

    @property
    def model(self) -> str:
        return self.http.model

    @property
    def config(self) -> Any:
        return self.http.config

    @property
    def classes(self) -> int | None:
        """The bundle's class count: the HTTP path refuses an answer outside it (the stream
        checks its answers against the session's classes)."""
        return self.http.classes

    @classes.setter
    def classes(self, value: int | None) -> None:
        self.http.classes = value

    @property
    def sent_bytes(self) -> int:
        return self.http.sent_bytes + self._sent

    @property
    def received_bytes(self) -> int:
        return self.http.received_bytes + self._received

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            with contextlib.suppress(BaseException):
                await self._opening
        if self._conn is not None:
            await self._conn.close()
        await self.http.aclose()

    def request_overhead(self) -> int:
        """Bytes a request puts on the wire besides its frame: on the stream, negative (the
        frame's 32-byte header stays home; id, point and WebSocket framing go)."""
        if self.stream_config.transport == "http":
            return self.http.request_overhead()
        return websocket_frame_bytes(2, masked=True) - 32

    async def metadata(self) -> dict[str, Any]:
        return await self.http.metadata()

    async def probe(self, large: bool = False) -> Exchange:
        return await self.http.probe(large)

    async def check_fingerprint(self, expected: str) -> dict[str, Any]:
        """The HTTP check, then the stream's handshake when the server offers one."""
        meta = await self.http.check_fingerprint(expected)
        mode = self.stream_config.transport
        if mode == "http":
            return meta
        params = meta.get("parameters") if isinstance(meta, dict) else None
        offered = isinstance(params, dict) and isinstance(params.get("stream"), dict)
        if not offered:
            return self._no_stream("the server offers no stream")
        try:
            await self._connection(time.monotonic() + self.http.config.timeout_s)
        except _NoStream as e:
            return self._no_stream(str(e), meta)
        except OffloadError as e:
            if e.fatal:
                raise
            self.log(f"the stream did not open ({e}); the first offloads will try again")
        self.transport = "stream"
        self.log(f"offloading over the stream ({SUBPROTOCOL})")
        return meta

    def _no_stream(self, why: str, meta: dict[str, Any] | None = None) -> Any:
        if self.stream_config.transport == "stream":
            raise OffloadRefused(f"{why}; run with --transport auto or http")
        if not self._on_http:  # once, however many offloads learn it at the same time
            self._on_http = True
            self.log(f"{why}: offloading over HTTP (KServe v2)")
        self.transport = "http"
        return meta if meta is not None else {}

    # --------------------------------------------------------------------------- infer

    async def infer(
        self, frame: bytes, request_id: str, *, deadline: float | None = None
    ) -> InferResult:
        """As `OffloadClient.infer`, over the stream when it is in use."""
        if self.transport != "stream":
            return await self.http.infer(frame, request_id, deadline=deadline)
        c = self.http.config
        end = deadline if deadline is not None else time.monotonic() + c.budget_s
        tally = _Tally()
        while True:
            left = end - time.monotonic()
            if left <= 0:
                late = OffloadTimeout("the deadline passed before an answer came")
                late.by_deadline = True
                raise tally.stamp(late)
            tally.attempts += 1
            attempt_s = min(c.timeout_s, left)
            try:
                return await self._attempt(frame, attempt_s, tally)
            except _NoStream as e:
                self._no_stream(str(e))
                return await self.http.infer(frame, request_id, deadline=deadline)
            except OffloadError as error:
                if isinstance(error, OffloadTimeout) and attempt_s < c.timeout_s:
                    error.by_deadline = True
                if not isinstance(error, _RETRYABLE) or tally.attempts > c.retries:
                    raise tally.stamp(error) from None
                last = error
            delay = self.rng.uniform(
                0.0, min(c.backoff_max_s, c.backoff_s * 2 ** (tally.attempts - 1))
            )
            if time.monotonic() + delay >= end:
                raise tally.stamp(last)
            await asyncio.sleep(delay)

    async def _attempt(self, frame: bytes, attempt_s: float, tally: _Tally) -> InferResult:
        stop = time.monotonic() + attempt_s
        conn = await self._connection(stop)
        mid = await conn.reserve(stop)
        try:
            message = message_from_frame(frame, mid, self.session)
        except ValueError as e:
            conn.release(mid)
            raise RequestRejected(f"this frame cannot go on the stream: {e}") from None
        up = websocket_frame_bytes(len(message), masked=True)
        body = len(message) - 2  # qparams and payload: the frame's content on the wire
        sent_at = time.monotonic()
        future = await conn.post(mid, message)
        self._sent += up
        try:
            answer, down = await conn.wait(future, stop)
        except OffloadError as e:
            self._received += e.response_bytes
            tally.add(up, e.response_bytes, body)
            raise
        self._received += down
        tally.add(up, down, body)
        seconds = time.monotonic() - sent_at
        return InferResult(
            answer,
            tally.attempts,
            tally.frame_bytes,
            tally.request_bytes,
            tally.response_bytes,
            sent_at,
            seconds,
            None,
        )

    # --------------------------------------------------------------------- connections

    async def _connection(self, stop: float) -> _Connection:
        """The open connection, or a new one by `stop` (raises OffloadError, _NoStream)."""
        if self._conn is not None and self._conn.alive:
            return self._conn
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._open())
        try:
            return await within(max(0.0, stop - time.monotonic()), asyncio.shield(self._opening))
        except TimeoutError:
            raise OffloadTimeout(
                "the stream did not connect before the attempt's time ran out"
            ) from None

    async def _open(self) -> _Connection:
        try:
            wait = self._next_connect - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                conn = await self._handshake()
            except OffloadError:
                self._failures += 1
                cfg = self.stream_config
                backoff = min(cfg.reconnect_max_s, cfg.reconnect_s * 2 ** (self._failures - 1))
                self._next_connect = time.monotonic() + self.rng.uniform(0.0, backoff)
                raise
            self._failures = 0
            if self._opened:
                self.reconnects += 1
            self._opened += 1
            self._conn = conn
            return conn
        finally:
            self._opening = None

    async def _handshake(self) -> _Connection:
        c, s = self.http.config, self.stream_config
        url = "ws" + self.http.base_url[4:] + f"/v2/models/{self.model}/stream"
        headers = {"Authorization": f"Bearer {c.token}"} if c.token else None
        try:
            ws = await connect(
                url,
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                additional_headers=headers,
                compression=None,
                open_timeout=c.connect_timeout_s,
                ping_interval=s.ping_interval_s,
                ping_timeout=s.ping_timeout_s,
                close_timeout=s.ping_timeout_s,
                max_size=2**20,
                user_agent_header=None,
                proxy=None,
            )
        except InvalidStatus as e:
            status = e.response.status_code
            if status in (401, 403):
                raise OffloadRefused(
                    f"the stream at {url} refused the token (HTTP {status}); pass the server's "
                    "token with --token-file",
                    status=status,
                ) from None
            if status in (429, 503):
                raise ServerBusy(f"the stream at {url}: HTTP {status}", status=status) from None
            raise _NoStream(f"the stream upgrade got HTTP {status}") from None
        except InvalidHandshake as e:
            raise _NoStream(f"the stream upgrade failed: {e}") from None
        except TimeoutError:
            raise OffloadTimeout(
                f"the stream at {url} did not open within {c.connect_timeout_s:.3g} s"
            ) from None
        except OSError as e:
            raise ServerUnreachable(f"cannot connect to {url}: {e}") from None
        reply: str | bytes = b""
        try:
            await within(c.timeout_s, ws.send(self.session.encode()))
            reply = await within(c.timeout_s, ws.recv())
            accepted = Accepted.decode(reply)
        except TimeoutError:
            await ws.close()
            raise OffloadTimeout(f"no handshake answer within {c.timeout_s:.3g} s") from None
        except ConnectionClosed as e:
            raise _handshake_refused(e, url) from None
        except StreamError as e:
            if isinstance(reply, str):  # an error answer: the close that follows says why
                with contextlib.suppress(TimeoutError):
                    await within(c.timeout_s, ws.wait_closed())
            await ws.close()
            code = ws.close_code
            if code is not None and code not in (1000, 1005, 1006):
                raise _close_error(code, ws.close_reason or str(e), url) from None
            raise ServerFailed(f"bad handshake answer from {url}: {e}") from None
        return _Connection(ws, accepted, self.session)


def _handshake_refused(e: ConnectionClosed, url: str) -> OffloadError | _NoStream:
    code = e.rcvd.code if e.rcvd is not None else 1006
    reason = e.rcvd.reason if e.rcvd is not None else "connection closed"
    return _close_error(code, reason, url)


def _close_error(code: int, reason: str, url: str) -> OffloadError | _NoStream:
    """What a close code means to the device (see `splitexit.protocol.stream`)."""
    if code == CLOSE_FINGERPRINT:
        return FingerprintRejected(
            f"the stream at {url} refused this device's bundle: {reason}; deploy the same "
            "bundle to the device and the server (offloading is stopped for this run)",
            status=409,
        )
    if code in (CLOSE_UNAUTHORIZED, CLOSE_NOT_FOUND):
        return OffloadRefused(f"the stream at {url} refused: {reason}; check --server and --model")
    if code == CLOSE_PROTOCOL:
        return _NoStream(f"the stream at {url} refused this session ({reason})")
    if code == CLOSE_DRAINING:
        return ServerBusy(f"the stream at {url} is not taking messages: {reason}", status=503)
    return ServerUnreachable(f"the stream at {url} closed ({code}: {reason})")


class _Connection:
    """One open stream: its reader, its window of ids, the messages waiting for answers."""

    def __init__(self, ws: ClientConnection, accepted: Accepted, session: Session) -> None:
        self.ws = ws
        self.accepted = accepted
        self.session = session
        window = accepted.window
        self._free = list(range(window - 1, -1, -1))
        self._slots = asyncio.Semaphore(window)
        self._pending: dict[int, asyncio.Future[tuple[Any, int]]] = {}
        self.error: OffloadError | _NoStream | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def alive(self) -> bool:
        return self.error is None

    async def reserve(self, stop: float) -> int:
        """A free message id, waiting for one until `stop` (the window is full meanwhile)."""
        try:
            await within(max(0.0, stop - time.monotonic()), self._slots.acquire())
        except TimeoutError:
            raise OffloadTimeout("the stream's window stayed full") from None
        if self.error is not None:
            self._slots.release()
            raise copy.copy(self.error)
        return self._free.pop()

    def release(self, mid: int) -> None:
        self._free.append(mid)
        self._slots.release()

    async def post(self, mid: int, message: bytes) -> asyncio.Future[tuple[Any, int]]:
        """Send message `mid`; the future of its answer and the answer's bytes on the wire.

        Raises ServerUnreachable (nothing went out) if the connection is gone."""
        future: asyncio.Future[tuple[Any, int]] = asyncio.get_running_loop().create_future()
        self._pending[mid] = future
        try:
            await self.ws.send(message)
        except ConnectionClosed:
            self._pending.pop(mid, None)
            self.release(mid)
            raise ServerUnreachable("the stream closed before the message went out") from None
        return future

    @staticmethod
    async def wait(future: asyncio.Future[tuple[Any, int]], stop: float) -> tuple[Any, int]:
        """The answer by `stop`; if it comes later, it is dropped (the id stays taken)."""
        try:
            return await within(max(0.0, stop - time.monotonic()), asyncio.shield(future))
        except TimeoutError:
            raise OffloadTimeout("no answer on the stream within the attempt's time") from None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader

    async def _read(self) -> None:
        session, classes = self.session, self.accepted.classes
        try:
            async for data in self.ws:
                if isinstance(data, str):
                    failure = decode_failure(data)
                    if failure.id is None or failure.id not in self._pending:
                        raise StreamError(f"an error answer for no message: {failure.message}")
                    self._answer(failure.id, _failure_error(failure), len(data.encode()))
                else:
                    mid, answers = decode_answer(data, session, classes)
                    if mid not in self._pending:
                        raise StreamError(f"an answer to message {mid}, which is not in flight")
                    self._answer(mid, answers[0].answer, len(data))
        except StreamError as e:
            self.error = ServerFailed(f"bad answer on the stream: {e}", status=200)
            await self.ws.close(1002, "bad answer")
        except ConnectionClosed:
            pass
        finally:
            if self.error is None:
                code = self.ws.close_code or 1006
                self.error = _close_error(code, self.ws.close_reason or "closed", "the server")
                if isinstance(self.error, ServerBusy):  # drained: reconnect, maybe elsewhere
                    self.error = ServerUnreachable(f"the stream was drained ({code})")
            for mid in list(self._pending):
                self._answer(mid, copy.copy(self.error), 0)

    def _answer(self, mid: int, result: Any, nbytes: int) -> None:
        future = self._pending.pop(mid)
        self.release(mid)
        down = websocket_frame_bytes(nbytes, masked=False) if nbytes else 0
        if future.done():  # its attempt timed out: a late answer, dropped
            return
        if isinstance(result, BaseException):
            result.response_bytes = down  # type: ignore[attr-defined]
            future.set_exception(result)
        else:
            future.set_result((result, down))


def _failure_error(f: Failure) -> OffloadError:
    """The OffloadError for an error answer (`code` as the HTTP statuses it stands for)."""
    text = f"the stream answered {f.code}: {f.message}"
    if f.code == "busy":
        return ServerBusy(text, status=429, retry_after_s=f.retry_after_s)
    if f.code == "deadline":
        return ServerBusy(text, status=504)
    if f.code == "rejected":
        return RequestRejected(text, status=400)
    return ServerFailed(text, status=500)
