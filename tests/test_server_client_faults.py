"""A client's fault is a 4xx, not a 5xx, and costs the server little: a body that stops
short, stalls, never ends or cannot be framed gets 408 / 400; a header trickled a byte at a
time gets 408; an upload refused before it was read (401, 413) closes its connection instead
of being read and thrown away. Raw sockets against the real server on loopback."""

from __future__ import annotations

import importlib.util
import json
import select
import socket
import threading
import time

import pytest
from fixtures.server import LiveServer
from support import server_settings

from splitexit.protocol.kserve import build_binary_request

TIMEOUT_S = 0.6  # the server's client_timeout_s in these tests


@pytest.fixture(scope="module")
def a(tiny_bundle):
    return tiny_bundle


def _parsers() -> list:
    has_httptools = importlib.util.find_spec("httptools") is not None
    skip = pytest.mark.skipif(not has_httptools, reason="httptools (the server extra) absent")
    return ["h11", pytest.param("httptools", marks=skip)]


@pytest.fixture(scope="module", params=_parsers())
def live(a, request, module_live_server):
    s = server_settings(
        a, client_timeout_s=TIMEOUT_S, warmup=False, auth_token="t0ken", http_parser=request.param
    )
    server = module_live_server(s, [a])
    yield server


def connect(live: LiveServer) -> socket.socket:
    host, port = live.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def head(a, length: int | str | None, *, token: str = "t0ken", extra: str = "") -> bytes:
    lines = [
        f"POST /v2/models/{a.name}/infer HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/octet-stream",
        "Inference-Header-Content-Length: 10",
        f"Authorization: Bearer {token}",
    ]
    if length == "chunked":
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        body += sock.recv(65536)
    return status, headers, body


def closed_by_server(sock: socket.socket, timeout: float = 3.0) -> bool:
    """True if the server closes the connection within `timeout` (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_a_body_that_stops_short_of_its_content_length_gets_408_and_a_closed_connection(live, a):
    with connect(live) as sock:
        start = time.monotonic()
        sock.sendall(head(a, 1000) + b"x" * 100)
        status, headers, body = read_response(sock)
        waited = time.monotonic() - start
        assert status == 408 and "did not arrive" in json.loads(body)["error"]
        assert headers["connection"] == "close"
        assert TIMEOUT_S * 0.8 < waited < TIMEOUT_S + 2
        assert closed_by_server(sock)


def test_408s_are_counted_in_the_metrics_body_and_header_alike(live, a):
    m = live.state.metrics
    route = {"route": "/v2/models/{name}/infer", "method": "POST", "code": 408}
    unmatched = {"route": "unmatched", "method": "OTHER", "code": 408}
    before = (
        m.requests.value(model=a.name, outcome="client_timeout"),
        m.http_requests.value(**route),
        m.http_requests.value(**unmatched),
    )
    with connect(live) as sock:  # the body stops short
        sock.sendall(head(a, 1000) + b"x" * 100)
        assert read_response(sock)[0] == 408
    with connect(live) as sock:  # the header stops short
        sock.sendall(head(a, 1000)[:40])
        assert read_response(sock)[0] == 408
    after = (
        m.requests.value(model=a.name, outcome="client_timeout"),
        m.http_requests.value(**route),
        m.http_requests.value(**unmatched),
    )
    assert [n - b for n, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert 'code="408",method="OTHER",route="unmatched"' in scrape(live)


def scrape(live: LiveServer) -> str:
    with connect(live) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return read_response(sock)[2].decode()


def test_a_body_trickled_slower_than_the_timeout_gets_408(live, a):
    with connect(live) as sock:
        sock.sendall(head(a, 50))
        status = None
        sock.settimeout(0.15)
        for _ in range(40):  # a byte every 0.15 s: 50 bytes would take 7.5 s
            try:
                sock.sendall(b"x")
                status, _, _ = read_response(sock)
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        assert status == 408


@pytest.mark.parametrize(
    ("chunks", "statuses"),
    [
        (b"10\r\n0123456789", {408}),  # a chunk that never ends
        (b"5\r\nhello\r\n", {408}),  # no last chunk
        (b"1000000000000000000\r\nabc", {400, 408, 413}),  # a chunk of 2^72 bytes
        (b"zz\r\n", {400}),  # no chunk size at all
    ],
)
def test_a_chunked_body_that_never_ends_or_cannot_be_framed_is_a_4xx(live, a, chunks, statuses):
    with connect(live) as sock:
        sock.sendall(head(a, "chunked") + chunks)
        status, _, _ = read_response(sock)
        assert status in statuses
        assert closed_by_server(sock)


def test_a_header_trickled_a_byte_at_a_time_gets_408_and_is_closed(live, a):
    request = head(a, 10)
    results: list[tuple[int | None, float]] = []

    def slow_client() -> None:
        with connect(live) as sock:
            start = time.monotonic()
            sock.settimeout(0.1)
            status = None
            for byte in request:
                try:
                    sock.sendall(bytes([byte]))
                    status, _, _ = read_response(sock)
                    break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionError):
                    break
            results.append((status, time.monotonic() - start))

    threads = [threading.Thread(target=slow_client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 20
    assert all(status == 408 for status, _ in results), results
    assert all(seconds < TIMEOUT_S + 3 for _, seconds in results), results


def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(live):
    with connect(live) as sock:
        start = time.monotonic()
        assert closed_by_server(sock, timeout=TIMEOUT_S + 3)
        assert time.monotonic() - start >= TIMEOUT_S * 0.8


@pytest.mark.parametrize(("token", "status"), [("wrong", 401), ("t0ken", 413)])
def test_a_refused_chunked_upload_is_not_read_the_connection_closes(live, a, token, status):
    with connect(live) as sock:
        sock.sendall(head(a, "chunked", token=token))
        chunk = b"%x\r\n" % 65536 + b"u" * 65536 + b"\r\n"
        sock.settimeout(2)
        try:
            for _ in range(400):  # up to 26 MB: over the 8 MiB body limit
                sock.sendall(chunk)
                if select.select([sock], [], [], 0)[0]:  # an answer came
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        got, headers, _ = read_response(sock)
        assert got == status
        assert headers["connection"] == "close"
        assert closed_by_server(sock)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):  # nobody reads the rest
            for _ in range(400):
                sock.sendall(chunk)


def test_a_small_refused_request_keeps_its_connection(live, a):
    body, headers = build_binary_request("frame", [a.frame(a.inputs(1, 0), 4, 8)])
    lines = [f"POST /v2/models/{a.name}/infer HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with connect(live) as sock:
        for auth, want in (("Bearer wrong", 401), ("Bearer t0ken", 200)):
            sock.sendall(("\r\n".join([*lines, f"Authorization: {auth}"]) + "\r\n\r\n").encode())
            sock.sendall(body)
            status, response_headers, _ = read_response(sock)
            assert status == want and response_headers.get("connection") != "close"
