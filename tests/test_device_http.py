"""The device's HTTP path (`splitexit_device.http`: httpcore's pool, as the client configures
it) keeps connections alive, reads every body framing a server may use, replaces connections the
server closed, bounds what it reads and how long it waits, and puts exactly the counted
bytes on the wire. Servers here are real sockets on loopback: the tail server itself, and
small scripted ones for what a real server rarely does."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from support import LOOPBACK

from splitexit.demo import free_port
from splitexit.link import LinkEmulator
from splitexit_device.client import OffloadClient, request_wire_bytes
from splitexit_device.http import fetch, http_transport, timeouts

Handler = Callable[["Scripted", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Scripted:
    """A loopback server that runs `handler(self, reader, writer, connection number)` per
    connection and keeps every request it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""
        self.finished = asyncio.Event()  # a handler returned

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One whole request (head and Content-Length body); b"" at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self.handler(self, reader, writer, self.connections)
        writer.close()
        self.finished.set()


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[Scripted]:
    srv = Scripted(handler)
    server = await asyncio.start_server(srv._serve, LOOPBACK, 0)
    srv.url = f"http://{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield srv


def get(url: str, timeout: float = 2.0, **phases: float) -> httpx.Request:
    return httpx.Request("GET", url + "/x", extensions={"timeout": {**timeouts(timeout), **phases}})


def answer_each(*responses: bytes) -> Handler:
    """Answer the requests of each connection with `responses` in turn, then wait for EOF."""

    async def handler(
        srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        for response in responses:
            if not await srv.read_request(reader):
                return
            writer.write(response)
            await writer.drain()
        await reader.read()

    return handler


# ------------------------------------------------------------------------------- keep-alive


def test_one_connection_carries_every_request_to_the_tail_server(
    device_bundle, tail_server
) -> None:
    tb = device_bundle

    async def go(url: str) -> tuple[int, int]:
        async with OffloadClient(url, tb.name) as client:
            for _ in range(5):
                await client.probe()
                await client.probe(large=True)
            return client.sent_bytes, client.received_bytes

    srv = tail_server(tb.path)
    with LinkEmulator(("127.0.0.1", srv.port)) as link:
        sent, received = asyncio.run(go(link.url))
        assert link.connections == 1
        assert (link.up.bytes, link.down.bytes) == (sent, received)  # counted: what crossed TCP
    assert sent > 10 * 50 and received > 10 * 50


def test_the_bytes_sent_are_exactly_the_bytes_counted() -> None:
    async def go() -> None:
        async with scripted(answer_each(OK)) as srv:
            transport = http_transport()
            request = httpx.Request(
                "POST",
                srv.url + "/v2/models/m/infer",
                content=b"\x00" * 300,
                headers={"X-Request-ID": "abc", "Content-Type": "application/octet-stream"},
                extensions={"timeout": timeouts(2.0)},
            )
            response = await fetch(transport, request)
            await transport.aclose()
        assert response.status_code == 200 and response.content == b"ok"
        assert len(srv.requests) == 1
        assert len(srv.requests[0]) == request_wire_bytes(request)
        assert srv.requests[0].startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n")
        assert srv.requests[0].endswith(b"\r\n\r\n" + b"\x00" * 300)

    asyncio.run(go())


def test_an_idle_connection_the_server_closed_is_replaced_without_resending() -> None:
    async def handler(
        srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await srv.read_request(reader)
        writer.write(OK)
        await writer.drain()  # then close at once, as a server whose keep-alive timed out

    async def go() -> None:
        async with scripted(handler) as srv:
            transport = http_transport()
            for _ in range(3):
                assert (await fetch(transport, get(srv.url))).content == b"ok"
                await asyncio.sleep(0.05)  # the close reaches the client while idle
            await transport.aclose()
        assert srv.connections == 3 and len(srv.requests) == 3

    asyncio.run(go())


def test_a_connection_lost_before_the_answer_is_an_error_not_a_retry() -> None:
    async def handler(
        srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await srv.read_request(reader)
        writer.transport.abort()

    async def go() -> None:
        async with scripted(handler) as srv:
            transport = http_transport()
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await fetch(transport, get(srv.url))
            await transport.aclose()
        assert srv.connections == 1 and len(srv.requests) == 1

    asyncio.run(go())


@pytest.mark.parametrize(
    ("response", "body", "reused"),
    [
        (OK, b"ok", True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n0A\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
            b"abc0123456789",
            True,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, b"ok", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    ],
    ids=["content-length", "chunked", "100-continue", "204", "connection-close", "http-1.0"],
)
def test_every_body_framing_is_read_and_reuse_follows_the_server(
    response: bytes, body: bytes, reused: bool
) -> None:
    async def go() -> Scripted:
        async with scripted(answer_each(response, response)) as srv:
            transport = http_transport()
            for _ in range(2):
                r = await fetch(transport, get(srv.url))
                assert r.content == body
            await transport.aclose()
        return srv

    srv = asyncio.run(go())
    assert srv.connections == (1 if reused else 2)


def test_a_body_delimited_by_the_end_of_the_connection_is_read() -> None:
    async def handler(
        srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000)
        await writer.drain()

    async def go() -> None:
        async with scripted(handler) as srv:
            transport = http_transport()
            assert (await fetch(transport, get(srv.url))).content == b"x" * 100_000
            assert (await fetch(transport, get(srv.url))).content == b"x" * 100_000
            await transport.aclose()
        assert srv.connections == 2

    asyncio.run(go())


# ------------------------------------------------------------------------ garbage and limits


@pytest.mark.parametrize(
    "response",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ],
    ids=[
        "not-http", "status-2000", "status-abc", "no-colon", "negative-length",
        "two-lengths", "over-max-body", "bad-chunk-size", "no-chunk-crlf", "gzip-framing",
        "huge-head", "short-body", "cut-head",
    ],
)  # fmt: skip
def test_garbage_and_oversized_answers_are_protocol_errors(response: bytes) -> None:
    async def handler(
        srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await srv.read_request(reader)
        writer.write(response)
        await writer.drain()

    async def go() -> None:
        async with scripted(handler) as srv:
            transport = http_transport()
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(transport, get(srv.url))
            await transport.aclose()

    asyncio.run(go())


def test_a_body_over_the_limit_is_refused_while_it_streams_in() -> None:
    async def handler(
        srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n")
        await writer.drain()

    async def go() -> None:
        async with scripted(handler) as srv:
            transport = http_transport()
            with pytest.raises(httpx.RemoteProtocolError, match="over 1000 bytes"):
                await fetch(transport, get(srv.url), max_body_bytes=1000)
            assert (await fetch(transport, get(srv.url))).content == b"x" * 1024
            await transport.aclose()

    asyncio.run(go())


def test_a_trickling_server_is_cut_at_the_read_timeout_for_the_whole_answer() -> None:
    async def handler(
        srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):  # one byte every 20 ms: each read is quick, the whole is not
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    async def go() -> float:
        async with scripted(handler) as srv:
            transport = http_transport()
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await fetch(transport, get(srv.url, read=0.3))
            seconds = time.monotonic() - start
            await transport.aclose()
            return seconds

    assert 0.3 <= asyncio.run(go()) < 0.3 + 0.3


def test_a_request_waits_for_a_free_connection_within_the_pool_timeout() -> None:
    async def handler(
        srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        while await srv.read_request(reader):
            await asyncio.sleep(0.5 if len(srv.requests) == 1 else 0.0)
            writer.write(OK)
            await writer.drain()

    async def go() -> None:
        async with scripted(handler) as srv:
            transport = http_transport(max_connections=1)
            slow = asyncio.ensure_future(fetch(transport, get(srv.url)))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            with pytest.raises(httpx.PoolTimeout):
                await fetch(transport, get(srv.url, pool=0.2))
            assert 0.2 <= time.monotonic() - start < 0.45
            assert (await slow).content == b"ok"  # the slot frees: the next one gets through
            assert (await fetch(transport, get(srv.url))).content == b"ok"
            await transport.aclose()
        assert srv.connections == 1

    asyncio.run(go())


def test_nobody_listening_is_a_connect_error_and_other_schemes_are_refused() -> None:
    async def go() -> None:
        transport = http_transport()
        with pytest.raises(httpx.ConnectError):
            await fetch(transport, get(f"http://{LOOPBACK}:{free_port()}"))
        with pytest.raises(httpx.UnsupportedProtocol):
            await fetch(transport, httpx.Request("GET", "ftp://example.invalid/x"))
        await transport.aclose()

    asyncio.run(go())


def test_closing_the_transport_closes_its_idle_connections() -> None:
    async def go() -> None:
        async with scripted(answer_each(OK)) as srv:
            transport = http_transport()
            await fetch(transport, get(srv.url))
            await transport.aclose()
            await asyncio.wait_for(srv.finished.wait(), 2.0)  # the handler saw EOF

    asyncio.run(go())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        http_transport(0)
    with pytest.raises(ValueError, match="server URL"):
        OffloadClient("localhost:8000", "m")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (made with openssl) and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x"]
    subprocess.run(
        [openssl, *args, "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_origins_are_spoken_to_over_tls_and_checked(
    tls_files: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def go() -> None:
        handler = answer_each(OK, OK)
        srv = Scripted(handler)
        server = await asyncio.start_server(srv._serve, LOOPBACK, 0, ssl=server_ctx)
        url = f"https://{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
        async with server:
            trusting = http_transport(ssl_context=ssl.create_default_context(cafile=cert))
            for _ in range(2):
                assert (await fetch(trusting, get(url))).content == b"ok"
            assert srv.connections == 1
            await trusting.aclose()
            stranger = http_transport()  # the system's CAs do not know this certificate
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(stranger, get(url))
            await stranger.aclose()
            monkeypatch.setenv("SSL_CERT_FILE", cert)  # the default context reads it
            told = http_transport()
            assert (await fetch(told, get(url))).content == b"ok"
            await told.aclose()

    asyncio.run(go())
