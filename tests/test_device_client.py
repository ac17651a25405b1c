"""The offload client speaks the Open Inference Protocol, and every timeout and retry it is
configured with actually happens: against servers that stall, fail, answer garbage, push
back, refuse, or never accept the connection."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fixtures.device import DeviceBundle
from support import LOOPBACK

from splitexit.demo import free_port
from splitexit.protocol.kserve import (
    ProtocolError,
    RequestedOutput,
    decode_response,
    encode_infer_response,
    encode_request,
    parse_infer_request,
)
from splitexit_device.client import (
    ClientConfig,
    FingerprintRejected,
    OffloadClient,
    OffloadRefused,
    OffloadTimeout,
    ServerBusy,
    ServerFailed,
    ServerUnreachable,
    metadata_fingerprint,
    server_seconds,
    server_timings,
)

FRAME = b"SX" + bytes(range(50))


@pytest.fixture(scope="module")
def frame(device_bundle) -> bytes:
    tb = device_bundle
    x = tb.bundle.preprocess(tb.images[:1])
    z = tb.head.run(x, exits=False).z
    return tb.head.frame(z, 8, 8)


def infer(tb: DeviceBundle, url: str, frame: bytes, config: ClientConfig, **kw: object) -> object:
    async def go() -> object:
        async with OffloadClient(url, tb.name, config, rng=random.Random(0)) as c:
            return await c.infer(frame, "req-1", **kw)  # type: ignore[arg-type]

    return asyncio.run(go())


def timed(f: object, *args: object, **kw: object) -> tuple[BaseException | object, float]:
    start = time.monotonic()
    try:
        out: object = f(*args, **kw)  # type: ignore[operator]
    except Exception as e:
        out = e
    return out, time.monotonic() - start


# --------------------------------------------------------------------------------- protocol


def test_request_is_what_the_server_parses_one_frame_from() -> None:
    body, n = encode_request(FRAME, "abc", timeout_us=1500)
    req = parse_infer_request(body, header_length=str(n), content_type="application/octet-stream")
    assert req.id == "abc"
    assert req.elements == [FRAME]
    assert [o.name for o in req.outputs] == ["class", "probability"]
    assert req.timeout_us == 1500


@pytest.mark.parametrize("binary", [False, True])
def test_json_and_binary_answers_decode(binary: bool) -> None:
    content, headers = encode_infer_response(
        model_name="m",
        model_version="1",
        request_id="abc",
        outputs=[RequestedOutput("class", binary), RequestedOutput("probability", binary)],
        tensors={
            "class": np.array([7]),
            "probability": np.array([0.75], dtype=np.float32),
            "logits": np.zeros((1, 10), dtype=np.float32),
        },
    )
    lowered = {k.lower(): v for k, v in headers.items()}
    answer = decode_response(content, lowered, "abc")
    assert (answer.prediction, answer.probability) == (7, 0.75)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x00garbage", "not an inference response"),
        (b'{"outputs": "no"}', "no `outputs`"),
        (b'{"id": "other", "outputs": []}', "answers request 'other'"),
        (b'{"outputs": [{"name": "class", "data": [3]}]}', "lacks the outputs"),
        (
            b'{"outputs": [{"name": "class", "data": [3]}, {"name": "probability", "data": [7]}]}',
            r"in \[0, 1\]",
        ),
        (
            b'{"outputs": [{"name": "class", "data": [-1]}, {"name": "probability", "data": [1]}]}',
            "non-negative",
        ),
    ],
)
def test_garbage_answers_are_protocol_errors(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_response(body, {}, "abc")


def answer_body(cls: str, probability: str) -> bytes:
    return (
        b'{"outputs": [{"name": "class", "data": [%s]}, {"name": "probability", "data": [%s]}]}'
        % (cls.encode(), probability.encode())
    )


@pytest.mark.parametrize(
    ("cls", "probability", "match"),
    [
        ("10", "0.5", "class` is 10, but the bundle has 10 classes"),
        ("99", "0.5", "class` is 99"),
        ("3", "NaN", "NaN or infinity"),
        ("3", "Infinity", "NaN or infinity"),
        ("3", "-0.5", r"in \[0, 1\]"),
        ("3", "true", "no numeric data"),
    ],
)
def test_impossible_answers_for_the_bundle_are_protocol_errors(cls, probability, match) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_response(answer_body(cls, probability), {}, "abc", classes=10)


def test_the_last_class_and_probabilities_zero_and_one_are_answers() -> None:
    for cls, p in (("9", "0"), ("0", "1.0")):
        answer = decode_response(answer_body(cls, p), {}, None, classes=10)
        assert (answer.prediction, answer.probability) == (int(cls), float(p))


def test_server_timing_and_metadata_fingerprint_are_read() -> None:
    import httpx

    r = httpx.Response(
        200, headers={"Server-Timing": "queue;dur=1.5, compute;dur=2, total;dur=4, x;dur=-1"}
    )
    assert server_seconds(r) == pytest.approx(0.004)
    assert server_timings(r) == pytest.approx({"queue": 0.0015, "compute": 0.002, "total": 0.004})
    assert server_seconds(httpx.Response(200, headers={"Server-Timing": "a;dur=1,b;dur=2"})) == (
        pytest.approx(0.003)
    )
    assert server_seconds(httpx.Response(200)) is None
    assert metadata_fingerprint({"parameters": {"fingerprint": "ab" * 32}}) == "ab" * 32
    assert metadata_fingerprint({"name": "triton"}) is None


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ClientConfig(timeout_s=0)
    with pytest.raises(ValueError, match="retries"):
        ClientConfig(retries=-1)


# ---------------------------------------------------------------------------------- timeouts


def test_each_attempt_is_cut_at_timeout_s_and_retried_with_the_same_id(
    frame: bytes, device_bundle, fault_server
) -> None:
    cfg = ClientConfig(timeout_s=0.3, retries=1, backoff_s=0.01, budget_s=10)
    srv = fault_server("stall", device_bundle)
    err, seconds = timed(infer, device_bundle, srv.url, frame, cfg)
    assert isinstance(err, OffloadTimeout) and err.reason == "timeout"
    assert err.attempts == 2
    assert srv.attempts == {"req-1": 2}
    assert 0.6 <= seconds < 0.6 + 0.5
    assert err.frame_bytes == 2 * len(frame)  # both attempts sent the frame


def test_the_deadline_bounds_all_attempts_and_says_so(
    frame: bytes, device_bundle, fault_server
) -> None:
    cfg = ClientConfig(timeout_s=5.0, retries=3)
    srv = fault_server("stall", device_bundle)
    err, seconds = timed(infer, device_bundle, srv.url, frame, cfg, deadline=time.monotonic() + 0.4)
    assert isinstance(err, OffloadTimeout) and err.reason == "deadline"
    assert 0.35 <= seconds < 0.4 + 0.4
    assert err.attempts == 1


def test_budget_bounds_a_request_without_deadline(
    frame: bytes, device_bundle, fault_server
) -> None:
    cfg = ClientConfig(timeout_s=5.0, budget_s=0.4, retries=3)
    srv = fault_server("stall", device_bundle)
    err, seconds = timed(infer, device_bundle, srv.url, frame, cfg)
    assert isinstance(err, OffloadTimeout)
    assert 0.35 <= seconds < 0.4 + 0.4


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listen queue is full: new connections are never accepted."""
    srv = socket.socket()
    srv.bind((LOOPBACK, 0))
    srv.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(srv.getsockname())
        fillers.append(c)
    time.sleep(0.05)
    yield srv.getsockname()[1]
    for c in fillers:
        c.close()
    srv.close()


def test_connecting_is_cut_at_connect_timeout_s(full_backlog: int, device_bundle) -> None:
    cfg = ClientConfig(timeout_s=5.0, connect_timeout_s=0.25, retries=0)
    err, seconds = timed(infer, device_bundle, f"http://{LOOPBACK}:{full_backlog}", FRAME, cfg)
    assert isinstance(err, OffloadTimeout)
    assert "connecting" in str(err)
    assert 0.2 <= seconds < 0.25 + 0.4
    assert err.frame_bytes == 0


# ----------------------------------------------------------------------------------- retries


def test_a_failed_first_attempt_is_retried_after_a_jittered_backoff(
    frame: bytes, device_bundle, fault_server
) -> None:
    cfg = ClientConfig(retries=2, backoff_s=0.1, backoff_max_s=1.0)
    tb = device_bundle
    srv = fault_server("flaky", tb)
    res = infer(device_bundle, srv.url, frame, cfg)
    assert res.attempts == 2  # type: ignore[attr-defined]
    assert srv.attempts == {"req-1": 2}
    gap = srv.times["req-1"][1] - srv.times["req-1"][0]
    assert gap < 0.1 + 0.15  # the first backoff is at most backoff_s (plus the request)
    want = int(tb.tail.run_frames([frame])[0].prediction[0])
    assert res.answer.prediction == want  # type: ignore[attr-defined]


def test_5xx_is_retried_then_reported_with_every_attempt_counted(
    frame: bytes, device_bundle, fault_server
) -> None:
    cfg = ClientConfig(retries=3, backoff_s=0.05, backoff_max_s=0.08)
    srv = fault_server("error500", device_bundle)
    err, _ = timed(infer, device_bundle, srv.url, frame, cfg)
    assert isinstance(err, ServerFailed) and err.status == 500
    assert err.attempts == 4 and srv.attempts == {"req-1": 4}
    gaps = np.diff(srv.times["req-1"])
    assert all(g < 0.08 + 0.15 for g in gaps)  # backoff capped at backoff_max_s
    assert err.request_bytes > 4 * len(frame)


def test_garbage_answers_are_retried_then_reported(
    frame: bytes, device_bundle, fault_server
) -> None:
    srv = fault_server("garbage", device_bundle)
    err, _ = timed(infer, device_bundle, srv.url, frame, ClientConfig(retries=1, backoff_s=0.01))
    assert isinstance(err, ServerFailed) and "bad answer" in str(err)
    assert err.attempts == 2


def test_429_is_not_retried_and_carries_retry_after(
    frame: bytes, device_bundle, fault_server
) -> None:
    srv = fault_server("busy", device_bundle, retry_after=3)
    err, _ = timed(infer, device_bundle, srv.url, frame, ClientConfig(retries=3))
    assert isinstance(err, ServerBusy) and err.reason == "busy"
    assert err.retry_after_s == 3.0
    assert srv.attempts == {"req-1": 1}


def test_no_server_is_retried_then_unreachable(device_bundle) -> None:
    cfg = ClientConfig(retries=2, backoff_s=0.01)
    err, seconds = timed(infer, device_bundle, f"http://{LOOPBACK}:{free_port()}", FRAME, cfg)
    assert isinstance(err, ServerUnreachable) and err.attempts == 3
    assert seconds < 1.0


# ------------------------------------------------------------------------------- fingerprint


def check(tb: DeviceBundle, url: str, fingerprint: str) -> object:
    async def go() -> object:
        async with OffloadClient(url, tb.name) as c:
            return await c.check_fingerprint(fingerprint)

    return asyncio.run(go())


def test_a_server_with_another_fingerprint_is_refused_naming_both(
    device_bundle, fault_server
) -> None:
    tb = device_bundle
    other = "0123456789abcdef" * 4
    srv = fault_server("ok", tb, fingerprint=other)
    with pytest.raises(FingerprintRejected, match="0123456789abcdef") as e:
        check(device_bundle, srv.url, tb.bundle.fingerprint)
    assert tb.bundle.fingerprint[:16] in str(e.value)
    assert "--local-only" in str(e.value)
    assert isinstance(check(device_bundle, srv.url, other), dict)


def test_an_unknown_model_is_refused(device_bundle, tail_server) -> None:

    tb = device_bundle
    srv = tail_server(tb.path)

    async def go() -> None:
        async with OffloadClient(srv.url, "no-such-model") as c:
            await c.metadata()

    with pytest.raises(OffloadRefused, match="--model"):
        asyncio.run(go())


def test_probes_and_metadata_are_cut_at_timeout_s_too(device_bundle, fault_server) -> None:
    async def go(url: str) -> list[float]:
        cfg = ClientConfig(timeout_s=0.3)
        seconds = []
        async with OffloadClient(url, device_bundle.name, cfg) as c:
            for call in (c.probe, lambda: c.probe(large=True), c.metadata):
                start = time.monotonic()
                with pytest.raises(OffloadTimeout):
                    await call()
                seconds.append(time.monotonic() - start)
        return seconds

    srv = fault_server("stall_all", device_bundle)
    assert all(0.3 <= s < 0.3 + 0.4 for s in asyncio.run(go(srv.url)))
