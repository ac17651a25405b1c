"""A lean HTTP/1.1 keep-alive transport for httpx: the device's path to one tail server.

    httpx.Request ─ pool: idle connection (or connect, `connect` timeout) ─ write head + body
        ─ read status line and headers ─ body by Content-Length / chunked / until close
        ─ httpx.Response (body read) ─ connection back to the pool if it may be reused

What httpcore does for a plain origin, at a fraction of its cost per request: no anyio
layers, no per-request state machine objects, one write per request (so a small request is
one TCP segment). On a 2-core CPU it saves 2-3 ms a request (`benchmarks/client_overhead.py`),
which is most of what HTTP costs around a 200-byte frame. It speaks only what the tail
server needs: HTTP/1.1 over TCP (`http://`) or TLS (`https://`), no proxies, no HTTP/2,
no `Expect: 100-continue`.

Timeouts come from the request's `timeout` extension as httpx sets it: `connect` bounds
opening a connection, `pool` waiting for a free one, and `read` the whole exchange once
connected (writing the request and reading every byte of the answer), so a server that
trickles its answer cannot stretch it. Errors are httpx's own (`ConnectTimeout`,
`ConnectError`, `ReadTimeout`, `PoolTimeout`, `ReadError`, `WriteError`,
`RemoteProtocolError`), so code written against httpx handles them unchanged.

A connection the server closed while idle (uvicorn closes idle keep-alive connections after
5 s) is noticed before reuse and dropped; if a reused connection still dies before a single
byte of the answer arrives, the request is sent once more on a new connection, as browsers
do (a request the server never saw). Responses are bounded: `max_header_bytes` for the head,
`max_body_bytes` for the body, checked before reading.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import Awaitable
from typing import TypeVar

import httpx

T = TypeVar("T")

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_NO_BODY_STATUS = (204, 304)


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


async def fetch(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> httpx.Response:
    """Send `request` through `transport` and read the whole answer (no redirects, no auth:
    what `httpx.AsyncClient.send` adds on top is not needed here)."""
    response = await transport.handle_async_request(request)
    try:
        await response.aread()
    finally:
        await response.aclose()
    return response


def timeouts(total_s: float, connect_s: float | None = None) -> dict[str, float]:
    """The `timeout` extension of a request: `total_s` for each phase, connecting within
    `connect_s` (default: `total_s`)."""
    connect = total_s if connect_s is None else min(connect_s, total_s)
    return {"connect": connect, "read": total_s, "write": total_s, "pool": total_s}


class _Connection:
    """One TCP (or TLS) connection and whether it may carry another request."""

    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def usable(self) -> bool:
        """False once the server closed it or sent something unasked while it was idle."""
        return not (self.writer.is_closing() or self.reader.at_eof() or _buffered(self.reader))

    def close(self) -> None:
        self.writer.close()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive connections to the origins of the requests it sends.

    Args:
        max_connections: connections open at once (a request waits for a free one within
            the `pool` timeout); idle ones are kept for reuse.
        max_header_bytes: longest response head (status line and headers) accepted.
        max_body_bytes: largest response body accepted.
        ssl_context: for `https://` origins (default: the system's trusted certificates).
    """

    def __init__(
        self,
        max_connections: int = 8,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1 or max_header_bytes < 64 or max_body_bytes < 0:
            raise ValueError(
                "max_connections must be >= 1, max_header_bytes >= 64, max_body_bytes >= 0"
            )
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._closed = False
        self.connections_opened = 0  # over the transport's life, for tests and benchmarks

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"{url.scheme!r} URLs are not supported: use http(s)")
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        body = await request.aread()
        head = _request_head(request)
        try:
            await within(timeouts.get("pool"), self._slots.acquire())
        except TimeoutError as e:
            raise httpx.PoolTimeout(
                f"no free connection within {timeouts.get('pool')} s", request=request
            ) from e
        try:
            origin = (url.raw_scheme, url.raw_host, url.port or _default_port(url.raw_scheme))
            while True:
                conn = await self._connection(origin, timeouts.get("connect"), request)
                try:
                    return await within(
                        timeouts.get("read"), self._exchange(conn, origin, head, body, request)
                    )
                except _StaleConnection:
                    continue  # a reused connection the server had closed: once more, fresh
                except TimeoutError as e:
                    raise httpx.ReadTimeout(
                        f"no complete answer within {timeouts.get('read')} s", request=request
                    ) from e
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        for conn in self._busy:
            conn.close()

    # ------------------------------------------------------------------------- internals

    async def _connection(
        self, origin: tuple[bytes, bytes, int], timeout: float | None, request: httpx.Request
    ) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable():
                conn.reused = True
                self._busy.add(conn)
                return conn
            conn.close()
        scheme, host, port = origin
        tls = None
        if scheme == b"https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            reader, writer = await within(
                timeout,
                asyncio.open_connection(
                    host.decode("ascii"), port, ssl=tls, limit=self.max_header_bytes
                ),
            )
        except TimeoutError as e:
            raise httpx.ConnectTimeout(f"connecting took over {timeout} s", request=request) from e
        except OSError as e:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
            raise httpx.ConnectError(str(e) or type(e).__name__, request=request) from e
        self.connections_opened += 1
        conn = _Connection(reader, writer)
        self._busy.add(conn)
        return conn

    async def _exchange(
        self,
        conn: _Connection,
        origin: tuple[bytes, bytes, int],
        head: bytes,
        body: bytes,
        request: httpx.Request,
    ) -> httpx.Response:
        """One request on `conn`; gives the connection back to the pool or closes it."""
        keep = False
        try:
            try:
                conn.writer.write(head + body)  # one write: a small request is one segment
                await conn.writer.drain()
            except OSError as e:
                if conn.reused:
                    raise _StaleConnection from e
                raise httpx.WriteError(f"sending the request failed: {e}", request=request) from e
            status, reason, version, headers = await self._read_head(conn, request)
            content, keep = await self._read_body(conn, request, status, version, headers)
        finally:
            self._busy.discard(conn)
            if keep and not self._closed:
                self._idle.setdefault(origin, []).append(conn)
            else:
                conn.close()
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(content),
            request=request,
            extensions={"http_version": version, "reason_phrase": reason},
        )

    async def _read_head(
        self, conn: _Connection, request: httpx.Request
    ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        """Status, reason, version and headers of the next final (non-1xx) response."""
        while True:
            try:
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError as e:
                raise httpx.RemoteProtocolError(
                    f"the response head is over {self.max_header_bytes} bytes", request=request
                ) from e
            except asyncio.IncompleteReadError as e:
                if not e.partial and conn.reused:
                    raise _StaleConnection from e
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a complete response head",
                    request=request,
                ) from e
            except OSError as e:
                if conn.reused:
                    raise _StaleConnection from e
                raise httpx.ReadError(f"reading the answer failed: {e}", request=request) from e
            status, reason, version, headers = _parse_head(raw, request)
            if not 100 <= status < 200:
                return status, reason, version, headers

    async def _read_body(
        self,
        conn: _Connection,
        request: httpx.Request,
        status: int,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> tuple[bytes, bool]:
        """The body, and whether the connection may carry another request."""
        fields: dict[bytes, bytes] = {}
        for k, v in headers:
            key = k.lower()
            fields[key] = fields[key] + b"," + v if key in fields else v
        keep = version == b"HTTP/1.1" and b"close" not in fields.get(b"connection", b"").lower()
        reader = conn.reader
        try:
            if request.method == "HEAD" or status in _NO_BODY_STATUS:
                return b"", keep
            coding = fields.get(b"transfer-encoding")
            if coding is not None:
                if coding.strip().lower() != b"chunked":
                    raise httpx.RemoteProtocolError(
                        f"unsupported Transfer-Encoding {coding.decode('latin-1')!r}",
                        request=request,
                    )
                return await self._read_chunked(reader, request), keep
            length = fields.get(b"content-length")
            if length is not None:
                n = _content_length(length, request)
                self._check_size(n, request)
                return await reader.readexactly(n), keep
            data = bytearray()  # delimited by the end of the connection
            while chunk := await reader.read(65536):
                data += chunk
                self._check_size(len(data), request)
            return bytes(data), False
        except asyncio.IncompleteReadError as e:
            raise httpx.RemoteProtocolError(
                "the server closed the connection in the middle of the body", request=request
            ) from e
        except asyncio.LimitOverrunError as e:
            raise httpx.RemoteProtocolError(
                "a chunk's size or trailer line is too long", request=request
            ) from e
        except OSError as e:
            raise httpx.ReadError(f"reading the answer failed: {e}", request=request) from e

    async def _read_chunked(self, reader: asyncio.StreamReader, request: httpx.Request) -> bytes:
        data = bytearray()
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as e:
                raise httpx.RemoteProtocolError(
                    "a chunk size line is too long", request=request
                ) from e
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                size = -1
            if size < 0 or not size_text:
                raise httpx.RemoteProtocolError(
                    f"bad chunk size {size_text[:20]!r}", request=request
                )
            if size == 0:  # trailers, then the blank line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return bytes(data)
            self._check_size(len(data) + size, request)
            data += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise httpx.RemoteProtocolError("a chunk does not end in CRLF", request=request)

    def _check_size(self, n: int, request: httpx.Request) -> None:
        if n > self.max_body_bytes:
            raise httpx.RemoteProtocolError(
                f"the response body is over {self.max_body_bytes} bytes", request=request
            )


class _StaleConnection(Exception):
    """A reused connection failed before any of the answer came: send on a new one."""


def _buffered(reader: asyncio.StreamReader) -> int:
    return len(getattr(reader, "_buffer", b""))


def _default_port(scheme: bytes) -> int:
    return 443 if scheme == b"https" else 80


def _request_head(request: httpx.Request) -> bytes:
    """Request line and headers, exactly as `httpx.Request` holds them (Host included)."""
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for key, value in request.headers.raw:
        lines += (key, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def _parse_head(
    raw: bytes, request: httpx.Request
) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        raise httpx.RemoteProtocolError(
            f"not an HTTP/1.x status line: {lines[0][:60]!r}", request=request
        )
    try:
        status = int(parts[1])
    except ValueError:
        status = 0
    if not 100 <= status <= 999:
        raise httpx.RemoteProtocolError(f"bad status code {parts[1]!r}", request=request)
    headers = []
    for line in lines[1:]:
        key, sep, value = line.partition(b":")
        if not sep or not key or key != key.strip():
            raise httpx.RemoteProtocolError(f"bad header line {line[:60]!r}", request=request)
        headers.append((key, value.strip()))
    return status, parts[2] if len(parts) > 2 else b"", parts[0], headers


def _content_length(value: bytes, request: httpx.Request) -> int:
    values = {v.strip() for v in value.split(b",")}
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}", request=request)
    return int(values.pop())
