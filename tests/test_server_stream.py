"""The stream endpoint against the real server on loopback, with a real WebSocket client: the
handshake and its refusals, answers equal to the tail's, the limits (window, queue, size),
batching with HTTP requests, drain, and garbage that only ever gets the stream's errors."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from typing import Any

import httpx
import pytest
from fixtures.server import LiveServer
from support import server_settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from splitexit.protocol.kserve import build_binary_request
from splitexit.protocol.stream import (
    CLOSE_DRAINING,
    CLOSE_FINGERPRINT,
    CLOSE_NOT_FOUND,
    CLOSE_PROTOCOL,
    MESSAGE_HEADER_SIZE,
    SUBPROTOCOL,
    Accepted,
    Session,
    StreamError,
    decode_answer,
    decode_failure,
    message_from_frame,
    session_for,
)


@pytest.fixture(scope="module")
def a(tiny_bundle):
    return tiny_bundle


def session_of(tb: Any, **changes: Any) -> Session:
    m = tb.bundle.manifest
    s = session_for(
        tb.name, tb.fingerprint, m.bottleneck.code_shape, [(1, 8), (2, 4), (4, 2), (4, 8)]
    )
    return Session(**{**s.__dict__, **changes})


def ws_url(live: LiveServer, name: str) -> str:
    return live.url.replace("http://", "ws://") + f"/v2/models/{name}/stream"


async def opened(
    live: LiveServer, session: Session, token: str | None = None
) -> tuple[ClientConnection, Accepted]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    ws = await connect(
        ws_url(live, session.model),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        additional_headers=headers,
        compression=None,
    )
    await ws.send(session.encode())
    reply = await ws.recv()
    return ws, Accepted.decode(reply)


async def refused(live: LiveServer, session_text: str, name: str) -> tuple[int, str, str]:
    """Send a handshake that must be refused: (close code, error text, close reason)."""
    async with connect(ws_url(live, name), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        await ws.send(session_text)
        failure = decode_failure(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code is not None
        return ws.close_code, failure.message, ws.close_reason or ""


def frames(tb: Any, n: int, k: int = 4, bits: int = 8, seed: int = 0) -> list[bytes]:
    x = tb.inputs(n, seed)
    return [tb.frame(x[i : i + 1], k, bits) for i in range(n)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ------------------------------------------------------------------------------- answers


def test_answers_are_the_tails_answers_for_the_same_frames(a, live_server):
    session = session_of(a)
    live = live_server(server_settings(a), [a])

    async def go() -> list[tuple[int, Any]]:
        ws, acc = await opened(live, session)
        out = []
        for k, bits in session.points:
            for f in frames(a, 3, k, bits, seed=k * bits):
                await ws.send(message_from_frame(f, 9, session))
                reply = decode_answer(await ws.recv(), session, acc.classes)
                assert reply.id == 9
                out.append((reply.samples[0].answer, a.local(f)))
        await ws.close()
        return out

    for got, want in run(go()):
        assert got.prediction == int(want.prediction[0])
        assert got.probability == pytest.approx(float(want.probability[0]), abs=1 / 65535)


def test_top_k_and_logits_come_only_when_the_session_asks(a, live_server):
    session = session_of(a, top_k=3, logits=True)
    live = live_server(server_settings(a), [a])

    async def go() -> Any:
        ws, acc = await opened(live, session)
        f = frames(a, 1)[0]
        await ws.send(message_from_frame(f, 0, session))
        data = await ws.recv()
        await ws.close()
        return data, decode_answer(data, session, acc.classes).samples[0], a.local(f)

    data, got, want = run(go())
    assert len(data) == 1 + 3 * (1 + 3) + 4 * 10  # id, (class u8, p u16) x 4, logits
    assert got.top_k[0][0] == got.answer.prediction == int(want.prediction[0])
    assert [c for c, _ in got.top_k] == want.logits[0].argsort(descending=True)[:3].tolist()
    assert got.logits == pytest.approx(want.logits[0].tolist(), rel=1e-6)


def test_messages_of_many_streams_and_http_requests_share_batches(a, live_server):
    s = server_settings(a, max_queue_delay_ms=150.0, max_batch_size=8)
    session = session_of(a)
    live = live_server(s, [a])

    async def go() -> list[Any]:
        conns = [await opened(live, session) for _ in range(3)]
        body, headers = build_binary_request("frame", frames(a, 1), outputs=["class"])
        async with httpx.AsyncClient(base_url=live.url) as http:
            post = asyncio.create_task(
                http.post(f"/v2/models/{a.name}/infer", content=body, headers=headers)
            )
            for i, (ws, _) in enumerate(conns):
                for j, f in enumerate(frames(a, 2, seed=i)):
                    await ws.send(message_from_frame(f, j, session))
            answers = [await ws.recv() for ws, _ in conns for _ in range(2)]
            assert (await post).status_code == 200
        for ws, _ in conns:
            await ws.close()
        return answers

    answers = run(go())
    metrics = live.state.metrics
    assert all(isinstance(x, bytes) for x in answers)
    assert metrics.inference_count.value(model=a.name) == 7
    assert metrics.execution_count.value(model=a.name) == 1  # one tail call for all seven
    assert metrics.requests.value(model=a.name, outcome="success") == 7


# ----------------------------------------------------------------------------- handshake


def test_another_fingerprint_is_refused_at_the_handshake_naming_both(a, live_server):
    wrong = "0123456789abcdef" * 4
    live = live_server(server_settings(a), [a])
    code, text, reason = run(refused(live, session_of(a, fingerprint=wrong).encode(), a.name))
    assert code == CLOSE_FINGERPRINT
    assert wrong in text and a.fingerprint in text and "deploy the same bundle" in text
    assert reason


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"code_shape": [4, 3, 3]}, "code shape"),
        ({"points": [[4, 16]]}, "bits"),
        ({"samples": 9}, "the most is 8"),
        ({"dictionary": True}, "no zstd dictionary"),
        ({"top_k": 11}, "top_k"),
        ({"colour": "blue"}, "unknown handshake fields"),
    ],
)
def test_a_session_the_model_cannot_serve_is_refused_with_4400(a, change, match, live_server):
    text = json.dumps(json.loads(session_of(a).encode()) | change)
    live = live_server(server_settings(a), [a])
    code, message, _ = run(refused(live, text, a.name))
    assert code == CLOSE_PROTOCOL
    assert match in message


def test_garbage_handshakes_get_4400_and_unknown_models_4404(a, live_server):
    live = live_server(server_settings(a), [a])
    for text in ("", "{", "[]", '{"v": 2}', session_of(a).encode().replace("1", "x", 1)):
        code, message, _ = run(refused(live, text, a.name))
        assert code == CLOSE_PROTOCOL, message
    code, message, _ = run(refused(live, session_of(a, model="nope").encode(), "nope"))
    assert code == CLOSE_NOT_FOUND and "tiny-a" in message
    assert httpx.get(f"{live.url}/v2/health/ready").status_code == 200


def test_the_bearer_token_is_checked_at_the_upgrade(a, live_server):
    live = live_server(server_settings(a, auth_token="sekrit"), [a])

    async def go() -> None:
        with pytest.raises(InvalidStatus) as e:
            await opened(live, session_of(a))
        assert e.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as e:
            await opened(live, session_of(a), token="wrong")
        assert e.value.response.status_code == 401
        ws, acc = await opened(live, session_of(a), token="sekrit")
        assert acc.window == 64 and acc.classes == 10
        await ws.close()

    run(go())


def test_an_upgrade_without_the_subprotocol_is_refused_with_400(a, live_server):
    live = live_server(server_settings(a), [a])

    async def go() -> None:
        with pytest.raises(InvalidStatus) as e:
            async with connect(ws_url(live, a.name)):
                pass
        assert e.value.response.status_code == 400

    run(go())


def test_the_model_metadata_offers_the_stream(a, live_server):
    live = live_server(server_settings(a), [a])
    meta = httpx.get(f"{live.url}/v2/models/{a.name}").json()
    assert meta["parameters"]["stream"] == {"path": f"/v2/models/{a.name}/stream", "version": 1}


# -------------------------------------------------------------------------------- limits


def test_a_full_window_answers_busy_and_the_connection_goes_on(a, live_server):
    s = server_settings(a, stream_window=2, max_queue_delay_ms=200.0)
    session = session_of(a)
    live = live_server(s, [a])

    async def go() -> list[Any]:
        ws, acc = await opened(live, session)
        assert acc.window == 2
        for i, f in enumerate(frames(a, 3)):
            await ws.send(message_from_frame(f, i, session))
        got = [await ws.recv() for _ in range(3)]
        await ws.send(message_from_frame(frames(a, 1)[0], 2, session))  # room again
        got.append(await ws.recv())
        await ws.close()
        return got

    first, *rest = run(go())
    busy = decode_failure(first)  # the third message came while two were in flight
    assert (busy.id, busy.code, busy.retry_after_s) == (2, "busy", 1.0)
    assert "window" in busy.message
    assert all(isinstance(x, bytes) for x in rest)


def test_a_full_queue_answers_busy_with_retry_after(a, live_server):
    s = server_settings(a, max_queue_size=1, max_queue_delay_ms=300.0, max_batch_size=8)
    session = session_of(a)
    live = live_server(s, [a])

    async def go() -> list[Any]:
        ws, _ = await opened(live, session)
        for i, f in enumerate(frames(a, 3)):
            await ws.send(message_from_frame(f, i, session))
        got = [await ws.recv() for _ in range(3)]
        await ws.close()
        return got

    got = run(go())
    failures = [decode_failure(x) for x in got if isinstance(x, str)]
    assert {f.id for f in failures} == {1, 2}
    assert all(f.code == "busy" and f.retry_after_s == 1.0 for f in failures)
    assert live.state.metrics.requests.value(model=a.name, outcome="overloaded") == 2


def test_a_message_over_the_size_limit_closes_the_connection_1009(a, live_server):
    session = session_of(a)
    live = live_server(server_settings(a, max_body_bytes=1024), [a])

    async def go() -> int | None:
        ws, _ = await opened(live, session)
        await ws.send(bytes(4096))
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        return ws.close_code

    assert run(go()) == 1009
    assert httpx.get(f"{live.url}/v2/health/ready").status_code == 200


def test_messages_past_their_session_timeout_answer_deadline(a, live_server):
    s = server_settings(a, max_queue_delay_ms=300.0)
    session = session_of(a, timeout_ms=50)
    live = live_server(s, [a])

    async def go() -> Any:
        ws, _ = await opened(live, session)
        await ws.send(message_from_frame(frames(a, 1)[0], 4, session))
        got = decode_failure(await ws.recv())
        await ws.close()
        return got

    failure = run(go())
    assert (failure.id, failure.code) == (4, "deadline")


# ------------------------------------------------------------------------------- garbage


def test_random_messages_get_only_the_streams_errors_and_the_server_lives_on(a, live_server):
    session = session_of(a)
    good = message_from_frame(frames(a, 1, 2, 4)[0], 0, session)
    rng = random.Random(0)
    cases: list[bytes] = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))]
    cases += [good[:n] for n in range(0, len(good))]
    for _ in range(60):
        flipped = bytearray(good)
        i = rng.randrange(len(flipped))
        flipped[i] ^= 1 << rng.randrange(8)
        cases.append(bytes(flipped))
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))) for _ in range(60)]
    live = live_server(server_settings(a), [a])

    async def go() -> list[str]:
        outcomes = []
        ws, acc = await opened(live, session)
        for data in cases:
            if data[:1] and data[0] != 0:  # keep ids unique: at most one in flight
                data = b"\x00" + data[1:]
            try:
                await ws.send(data)
                reply = await ws.recv()
            except ConnectionClosed:
                assert ws.close_code == CLOSE_PROTOCOL, ws.close_code
                outcomes.append("closed")
                ws, acc = await opened(live, session)
                continue
            if isinstance(reply, str):
                failure = decode_failure(reply)
                assert failure.code == "rejected" and failure.id == 0, failure
                outcomes.append("rejected")
            else:
                decode_answer(reply, session, acc.classes)  # a bit flip in the payload
                outcomes.append("answered")
        await ws.close()
        return outcomes

    outcomes = run(go())
    assert httpx.get(f"{live.url}/v2/health/ready").status_code == 200
    errors = live.state.metrics.requests.value(model=a.name, outcome="error")
    assert errors == 0  # never a 500
    assert {"rejected", "closed"} <= set(outcomes)


# --------------------------------------------------------------------------------- drain


def test_sigterm_answers_messages_in_flight_then_closes_4503(a, live_server):
    live = live_server(server_settings(a, max_queue_delay_ms=300.0, max_batch_size=8), [a])
    session = session_of(a)

    async def go() -> tuple[list[Any], Any, int | None, float]:
        ws, _ = await opened(live, session)
        for i, f in enumerate(frames(a, 3)):
            await ws.send(message_from_frame(f, i, session))
        await asyncio.sleep(0.05)  # in the batcher, waiting for the batch to fill
        start = time.monotonic()
        live.server.handle_exit(signal.SIGTERM, None)
        answers = [await ws.recv() for _ in range(3)]
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        late = None
        try:
            await opened(live, session)
        except (ConnectionClosed, OSError, InvalidStatus, StreamError) as e:
            late = e
        return answers, late, ws.close_code, time.monotonic() - start

    answers, late, code, seconds = run(go())
    assert all(isinstance(x, bytes) for x in answers)  # in flight: answered
    assert code == CLOSE_DRAINING
    assert late is not None  # draining or gone: no new stream
    live.join(15)  # SIGTERM ended uvicorn's thread
    assert live.state.phase == "stopped"
    assert seconds < 5


def test_stream_metrics_count_connections_and_outcomes(a, live_server):
    session = session_of(a)
    live = live_server(server_settings(a), [a])
    message = message_from_frame(frames(a, 1)[0], 0, session)

    async def go() -> str:
        ws, _ = await opened(live, session)
        await ws.send(message)
        await ws.recv()
        await ws.send(b"\x01\x77")  # no such point
        await ws.recv()
        async with httpx.AsyncClient(base_url=live.url) as c:
            text = (await c.get("/metrics")).text
        await ws.close()
        return text

    text = run(go())
    assert f'splitexit_stream_connections{{model="{a.name}"}} 1' in text
    m = live.state.metrics
    assert m.requests.value(model=a.name, outcome="success") == 1
    assert m.requests.value(model=a.name, outcome="bad_request") == 1
    # the frame's bytes as they crossed the wire: qparams and payload, no 32-byte header
    assert m.frame_bytes.value(model=a.name) == len(message) - MESSAGE_HEADER_SIZE


def test_a_refused_message_is_logged_with_its_connection_and_id(a, caplog, live_server):
    session = session_of(a)
    live = live_server(server_settings(a), [a])
    with caplog.at_level("INFO", logger="server.stream"):

        async def go() -> None:
            ws, _ = await opened(live, session)
            await ws.send(b"\x07\x77")  # no such point
            await ws.recv()
            await ws.close()

        run(go())
    lines = [r for r in caplog.records if getattr(r, "request_id", "").endswith("-7")]
    assert lines and lines[0].outcome == "bad_request"
    assert "operating point 119" in lines[0].getMessage()
