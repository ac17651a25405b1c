"""Admission control keeps what it admits on time: a request predicted to wait past the
queue-delay target gets 429 at the door, one that waited past it is dropped uncomputed (429),
one whose own timeout cannot hold one batch gets 504 uncomputed; the rest are answered."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fixtures.server import LiveServer
from support import server_settings as settings

from splitexit.protocol.kserve import HEADER_LENGTH, build_binary_request
from splitexit.runtime.tail import TailRunner
from splitexit_device.client import server_timings
from splitexit_server.admission import RATE_WINDOW_S, Admission
from splitexit_server.errors import DeadlineExceeded, Overloaded

TARGET_MS = 100.0


def test_the_predicted_wait_counts_full_batches_ahead_and_the_running_one():
    adm = Admission(0.05, max_batch_size=8, workers=2)
    adm.record_batch(0.02)
    assert adm.expected_wait(ahead=0, running=False) == 0.0
    assert adm.expected_wait(ahead=7, running=True) == pytest.approx(0.01)
    assert adm.expected_wait(ahead=40, running=True) == pytest.approx(6 * 0.02 / 2)
    adm.inflight = 7
    assert adm.at_door("m", running=True) is None
    adm.inflight = 40
    refused = adm.at_door("m", running=True)
    assert isinstance(refused, Overloaded) and refused.headers["Retry-After"] == "1"
    assert "60 ms" in refused.message and "50 ms target" in refused.message


def test_a_timeout_shorter_than_one_batch_is_504_and_one_shorter_than_the_queue_429():
    adm = Admission(1.0, max_batch_size=1)
    adm.record_batch(0.01)
    assert isinstance(adm.within("m", ahead=0, running=False, left_s=0.005), DeadlineExceeded)
    assert isinstance(adm.within("m", ahead=5, running=True, left_s=0.03), Overloaded)
    assert adm.within("m", ahead=1, running=False, left_s=0.03) is None


def test_the_predicted_wait_counts_the_answer_rate_when_the_server_is_busy():
    """The batch time alone misses the event loop's share of each request (its HTTP, its
    answer): the answer rate measured while the server was never idle counts both."""
    adm = Admission(0.05, max_batch_size=8)
    adm.record_batch(0.001)  # the model alone would take 40 requests in 5 ms
    for _ in range(12):
        adm.enter()
    time.sleep(RATE_WINDOW_S * 1.5)
    for _ in range(3):
        adm.leave()  # 3 answers in one busy window: a few dozen per second
    assert 0 < adm.answer_rate < 3 / RATE_WINDOW_S
    assert adm.inflight == 9
    refused = adm.at_door("m", running=True)
    assert isinstance(refused, Overloaded) and "queue_delay_target_ms" in refused.message
    while adm.inflight >= adm.max_batch_size // 2:
        adm.leave()
    assert adm.at_door("m", running=True) is None  # half a batch is always let in


def test_an_idle_moment_gives_no_answer_rate():
    adm = Admission(0.05, max_batch_size=8)
    adm.enter()
    time.sleep(RATE_WINDOW_S * 1.5)
    adm.leave()  # nothing was left in flight: the window shows the load, not the rate
    adm.enter()
    adm.leave()
    assert adm.answer_rate == 0.0


def test_the_batch_time_follows_the_measured_batches():
    adm = Admission(0.05, max_batch_size=1)
    assert adm.batch_s == 0.0
    adm.record_batch(0.010)
    assert adm.batch_s == 0.010  # the first measurement, as is
    for _ in range(50):
        adm.record_batch(0.030)
    assert adm.batch_s == pytest.approx(0.030, rel=1e-3)


@pytest.fixture(scope="module")
def a(tiny_bundle):
    return tiny_bundle


def slow_model(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every tail call takes `seconds` longer: a slow model, measured as such."""
    original = TailRunner.run_codes

    def slow(self, codes):
        time.sleep(seconds)
        return original(self, codes)

    monkeypatch.setattr(TailRunner, "run_codes", slow)


async def burst(url: str, path: str, requests: list[tuple[bytes, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        return await asyncio.gather(*(c.post(path, content=b, headers=h) for b, h in requests))


def test_under_a_burst_admitted_requests_wait_at_most_the_target_the_rest_get_429(a, monkeypatch):
    slow_model(monkeypatch, 0.15)
    s = settings(a, max_batch_size=1, queue_delay_target_ms=TARGET_MS, warmup=False)
    with LiveServer(s, [a]) as live:
        path = f"/v2/models/{a.name}/infer"
        frame = a.frame(a.inputs(1, 0), 4, 8)
        requests = [build_binary_request("frame", [frame], outputs=["class"])] * 12
        first = asyncio.run(burst(live.url, path, requests))  # no batch measured yet
        second = asyncio.run(burst(live.url, path, requests))  # now the door knows
        model = live.state.models[a.name]
        computed = model.metrics.inference_count.value(model=a.name)
    for responses in (first, second):
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert "queue_delay_target_ms" in r.json()["error"]
            else:
                assert server_timings(r)["queue"] <= (TARGET_MS + 30) / 1e3
    dropped = [r for r in first if "dropped uncomputed" in r.text]
    assert dropped  # they came before any batch was measured: queued, then dropped
    at_door = [r for r in second if "would wait about" in r.text]
    assert at_door  # refused before their body was read
    ok = sum(r.status_code == 200 for r in first + second)
    assert computed == ok  # nothing refused was computed


def test_a_request_whose_timeout_cannot_hold_one_batch_is_504_uncomputed(a, monkeypatch):
    slow_model(monkeypatch, 0.05)
    s = settings(a, max_batch_size=1, queue_delay_target_ms=TARGET_MS, warmup=False)
    with LiveServer(s, [a]) as live, httpx.Client(base_url=live.url, timeout=10) as c:
        path = f"/v2/models/{a.name}/infer"
        body, headers = build_binary_request("frame", [a.frame(a.inputs(1, 0), 4, 8)])
        assert c.post(path, content=body, headers=headers).status_code == 200  # measured
        n = int(headers[HEADER_LENGTH])
        doc = json.loads(body[:n])
        doc["parameters"]["timeout"] = 10_000  # 10 ms: less than one 50 ms batch
        head = json.dumps(doc).encode()
        short, short_headers = head + body[n:], {**headers, HEADER_LENGTH: str(len(head))}
        r = c.post(path, content=short, headers=short_headers)
        assert r.status_code == 504 and "shorter than one batch" in r.json()["error"]
        assert live.state.metrics.inference_count.value(model=a.name) == 1


def _parsers() -> list:
    import importlib.util

    skip = pytest.mark.skipif(
        importlib.util.find_spec("httptools") is None, reason="httptools (server extra) absent"
    )
    return ["h11", pytest.param("httptools", marks=skip)]


@pytest.mark.parametrize("parser", _parsers())
def test_a_request_refused_at_the_door_keeps_its_connection_for_the_next(a, parser):
    """The door's 429 (written by the HTTP protocol itself with httptools) drops the small
    body unread and the same connection carries the next request."""
    import socket

    s = settings(a, warmup=False, http_parser=parser, queue_delay_target_ms=TARGET_MS)
    with LiveServer(s, [a]) as live:
        model = live.state.models[a.name]
        body, headers = build_binary_request("frame", [a.frame(a.inputs(1, 0), 4, 8)])
        head = [f"POST /v2/models/{a.name}/infer HTTP/1.1", "Host: x"]
        head += [f"{k}: {v}" for k, v in {**headers, "Content-Length": len(body)}.items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            answers = []
            for target_s in (-1.0, TARGET_MS / 1e3, -1.0, TARGET_MS / 1e3):
                model.admission.target_s = target_s  # -1: every request waits too long
                sock.sendall(request)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                header, _, rest = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in header.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                while len(rest) < length:
                    rest += sock.recv(65536)
                assert b"connection: close" not in header.lower()
                answers.append(int(header.split()[1]))
        assert answers == [429, 200, 429, 200]


WHOLE = (
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (WHOLE, "/v2/models/m/infer"),
        (WHOLE.replace(b"Content-Length", b"content-length"), "/v2/models/m/infer"),
        (WHOLE[:-1], None),  # the body is not all there
        (WHOLE + b"GET /v2 HTTP/1.1\r\n\r\n", None),  # a second request follows
        (WHOLE.replace(b"Host: x", b"Transfer-Encoding: chunked"), None),
        (WHOLE.replace(b"Host: x", b"Connection: close"), None),
        (WHOLE.replace(b"Host: x", b"Expect: 100-continue"), None),
        (WHOLE.replace(b"Host: x", b"Content-Length: 5"), None),  # two lengths
        (WHOLE.replace(b"Host: x", b"Host: x\r\n folded"), None),
        (WHOLE.replace(b"Host: x\r\n", b"Host: x\n"), None),  # a bare LF
        (WHOLE.replace(b"Host: x", b"Host: \x00"), None),
        (WHOLE.replace(b"/infer", b"/infer?x=1"), None),
        (WHOLE.replace(b"/m/", b"/%6d/"), None),
        (WHOLE.replace(b"HTTP/1.1", b"HTTP/1.0"), None),
        (WHOLE.replace(b"POST", b"PUT"), None),
    ],
)
def test_only_one_whole_plain_post_is_refused_from_its_bytes(data, path):
    """Anything a parser would have to judge goes to the parser (which refuses it at the
    door all the same when it is an inference request)."""
    from splitexit_server.connection import whole_post

    assert whole_post(data) == path


def _raw_request(a, body: bytes, headers: dict) -> bytes:
    head = [f"POST /v2/models/{a.name}/infer HTTP/1.1", "Host: x"]
    head += [f"{k}: {v}" for k, v in {**headers, "Content-Length": len(body)}.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _read_response(f) -> tuple[int, bytes, bytes]:
    """One response from the socket file `f`: status, lowercased header, body."""
    status = f.readline()
    if not status:
        raise ConnectionError("closed")
    lines = []
    while (line := f.readline()) not in (b"\r\n", b""):
        lines.append(line.lower())
    header = b"".join(lines)
    length = int(
        next(v for k, _, v in (x.partition(b":") for x in lines) if k == b"content-length")
    )
    return int(status.split()[1]), header, f.read(length)


@pytest.mark.parametrize("parser", _parsers())
def test_pipelined_requests_refused_at_the_door_are_answered_in_order(a, parser):
    import socket

    s = settings(a, warmup=False, http_parser=parser, queue_delay_target_ms=TARGET_MS)
    with LiveServer(s, [a]) as live:
        live.state.models[a.name].admission.target_s = -1.0  # every request waits too long
        body, headers = build_binary_request("frame", [a.frame(a.inputs(1, 0), 4, 8)])
        request = _raw_request(a, body, headers)
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            f = sock.makefile("rb")
            sock.sendall(request * 3)  # one read holds three requests: the parser's case
            for _ in range(3):
                status, header, rest = _read_response(f)
                assert status == 429 and b"retry-after: 1" in header
                assert "queue_delay_target_ms" in json.loads(rest)["error"]
            sock.sendall(request[:40])  # a request in two reads: the parser's case too
            time.sleep(0.05)
            sock.sendall(request[40:])
            assert _read_response(f)[0] == 429
            live.state.models[a.name].admission.target_s = TARGET_MS / 1e3
            sock.sendall(request)
            assert _read_response(f)[0] == 200


def test_a_connection_only_refused_from_its_bytes_still_times_out_when_idle(a):
    """Refusals written from a request's bytes bypass uvicorn's keep-alive bookkeeping: the
    connection stays open while they come, and closes once it idles as long as uvicorn's
    keep-alive timeout (5 s)."""
    import importlib.util
    import socket

    if importlib.util.find_spec("httptools") is None:
        pytest.skip("httptools (server extra) absent")
    s = settings(a, warmup=False, http_parser="httptools", queue_delay_target_ms=TARGET_MS)
    with LiveServer(s, [a]) as live:
        live.state.models[a.name].admission.target_s = -1.0
        body, headers = build_binary_request("frame", [a.frame(a.inputs(1, 0), 4, 8)])
        request = _raw_request(a, body, headers)
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=15) as sock:
            f = sock.makefile("rb")
            for _ in range(7):  # 7 s of refusals, one a second: longer than the timeout
                sock.sendall(request)
                assert _read_response(f)[0] == 429
                time.sleep(1.0)
            start = time.monotonic()
            assert f.read(1) == b""  # closed by the server, once idle
            assert time.monotonic() - start < 10


def test_after_warm_up_what_is_alive_is_kept_out_of_the_collector(a):
    """The collector's full passes would scan the models and the app again and again under
    load, stopping the event loop each time: warm-up freezes them."""
    import gc

    gc.unfreeze()
    with LiveServer(settings(a), [a]) as live:
        assert live.state.models[a.name].ready
        assert gc.get_freeze_count() > 0
    gc.unfreeze()
