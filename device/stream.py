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
                retried by the HTTP path's loop (`client.with_retries`), on a new connection
                when the old one is gone

Liveness: the client pings every `ping_interval_s`; a server that does not answer within
`ping_timeout_s` (dead, stalled, partitioned) has its connection closed, and every message
in flight on it fails at once, instead of at its own timeout. A message whose attempt timed
out keeps its id until its late answer comes (or the connection goes), so an id is never
reused while the server may still answer it. Bytes are counted as they cross TCP: each
message or answer as one WebSocket frame (2-10 header bytes, a 4-byte mask upstream); the
keepalive pings (10 B up, 6 B down each) are not charged to any offload. A stream offload's
`frame_bytes` are the frame's content (quantization parameters and payload): its 32-byte
header is not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from splitexit.bundle import Bundle
from splitexit.protocol.errors import StreamError
from splitexit.protocol.kserve import INPUT_FRAME
from splitexit.protocol.stream import (
    SUBPROTOCOL,
    Accepted,
    Session,
    message_from_frame,
    session_for,
    websocket_frame_bytes,
)

from .client import Exchange, InferResult, OffloadClient, Tally, with_retries
from .config import operating_points
from .connection import Connection, NoStream, close_error, fresh, handshake_refused
from .errors import (
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


def bundle_session(
    bundle: Bundle, model: str, timeout_s: float | None = None, *, timing: bool = False
) -> Session:
    """The session a device running `bundle` states: its operating points, codec, shape;
    `timing` asks the server for its times in every answer (4 more bytes each)."""
    m = bundle.manifest
    return session_for(
        model,
        bundle.fingerprint,
        m.bottleneck.code_shape,
        [(p.channels, p.bits) for p in operating_points(bundle)],
        dictionary=m.codec.dictionary is not None,
        timeout_ms=None if timeout_s is None else timeout_s * 1e3,
        timing=timing,
    )


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
        self._conn: Connection | None = None
        self._opening: asyncio.Task[Connection] | None = None
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
        except NoStream as e:
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
        self,
        frame: bytes,
        request_id: str,
        *,
        deadline: float | None = None,
        input_name: str = INPUT_FRAME,
    ) -> InferResult:
        """As `OffloadClient.infer`, over the stream when it is in use; an image (`input_name`
        "image") always goes over HTTP: the stream carries codes only."""
        if self.transport != "stream" or input_name != INPUT_FRAME:
            return await self.http.infer(
                frame, request_id, deadline=deadline, input_name=input_name
            )

        async def send(attempt_s: float, left: float, tally: Tally) -> InferResult:
            return await self._attempt(frame, attempt_s, tally)

        try:
            return await with_retries(self.http.config, self.rng, deadline, send)
        except NoStream as e:
            self._no_stream(str(e))
            return await self.http.infer(frame, request_id, deadline=deadline)

    async def _attempt(self, frame: bytes, attempt_s: float, tally: Tally) -> InferResult:
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
            reply, down = await conn.wait(future, stop)
        except OffloadError as e:
            self._received += e.response_bytes
            tally.add(up, e.response_bytes, body)
            raise
        self._received += down
        tally.add(up, down, body)
        seconds = time.monotonic() - sent_at
        return tally.result(
            reply.samples[0].answer, sent_at, seconds, reply.server_s, reply.compute_s
        )

    # --------------------------------------------------------------------- connections

    async def _connection(self, stop: float) -> Connection:
        """The open connection, or a new one by `stop` (raises OffloadError, NoStream)."""
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
        except OffloadError as e:  # one failed connect, many waiting: each its own error
            raise fresh(e) from None

    async def _open(self) -> Connection:
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

    async def _handshake(self) -> Connection:
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
            raise NoStream(f"the stream upgrade got HTTP {status}") from None
        except InvalidHandshake as e:
            raise NoStream(f"the stream upgrade failed: {e}") from None
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
            raise handshake_refused(e, url) from None
        except StreamError as e:
            if isinstance(reply, str):  # an error answer: the close that follows says why
                with contextlib.suppress(TimeoutError):
                    await within(c.timeout_s, ws.wait_closed())
            await ws.close()
            code = ws.close_code
            if code is not None and code not in (1000, 1005, 1006):
                raise close_error(code, ws.close_reason or str(e), url) from None
            raise ServerFailed(f"bad handshake answer from {url}: {e}") from None
        return Connection(ws, accepted, self.session)
