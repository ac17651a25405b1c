"""The server protects itself: body limits (413, announced or streamed), bearer auth (401)
with health and metrics open, back-pressure (429 + Retry-After), deadlines (504), 503 until
warm, and a graceful drain on shutdown (in-flight requests finish, new ones get 503)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest
from fixtures.server import LiveServer
from support import server_settings

from splitexit.protocol.kserve import HEADER_LENGTH, build_binary_request
from splitexit_server.model import ServedModel


@pytest.fixture(scope="module")
def a(tiny_bundle):
    return tiny_bundle


def request_for(a, seed=0):
    return build_binary_request("frame", [a.frame(a.inputs(1, seed), 4, 8)], outputs=["class"])


def slow_down(server: LiveServer, seconds: float) -> None:
    """Make every batch take `seconds` longer (a slow model)."""
    for model in server.state.models.values():
        original = model.batcher.process

        def slow(jobs, original=original):
            time.sleep(seconds)
            return original(jobs)

        model.batcher.process = slow


async def burst(url: str, path: str, body: bytes, headers: dict, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=20) as c:
        return await asyncio.gather(
            *(c.post(path, content=body, headers=headers) for _ in range(n))
        )


def test_body_limit_on_content_length_and_on_streamed_bytes(a, live_server):
    live = live_server(server_settings(a, max_body_bytes=4096, warmup=False), [a])
    with httpx.Client(base_url=live.url, timeout=10) as c:
        path = f"/v2/models/{a.name}/infer"
        r = c.post(path, content=b"x" * 5000)
        assert r.status_code == 413 and "4096" in r.json()["error"]

        def chunks():  # no Content-Length: chunked transfer encoding
            for _ in range(8):
                yield b"y" * 1024

        r = c.post(path, content=chunks())
        assert "content-length" not in r.request.headers
        assert r.status_code == 413 and "at most 4096 bytes" in r.json()["error"]
        body, headers = request_for(a)
        assert len(body) < 4096
        assert c.post(path, content=body, headers=headers).status_code == 200
        assert c.get("/v2/health/ready").status_code == 200


def test_bearer_token_guards_inference_and_metadata_not_health_or_metrics(a, live_server):
    token = "s3cret-token"
    live = live_server(server_settings(a, auth_token=token, warmup=False), [a])
    with httpx.Client(base_url=live.url, timeout=10) as c:
        body, headers = request_for(a)
        path = f"/v2/models/{a.name}/infer"
        for auth in (None, "Bearer wrong", f"Basic {token}", "Bearer", token):
            h = dict(headers) if auth is None else {**headers, "Authorization": auth}
            r = c.post(path, content=body, headers=h)
            assert r.status_code == 401, auth
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert token not in r.text
        for path_ in ("/v2", f"/v2/models/{a.name}"):
            assert c.get(path_).status_code == 401
        for open_path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            assert c.get(open_path).status_code == 200, open_path
        ok = {**headers, "Authorization": f"Bearer {token}"}
        assert c.post(path, content=body, headers=ok).status_code == 200
        assert c.get(f"/v2/models/{a.name}", headers=ok).status_code == 200


def test_full_queue_answers_429_with_retry_after_and_recovers(a, live_server):
    s = server_settings(a, max_batch_size=1, max_queue_size=1, retry_after_s=3, warmup=False)
    live = live_server(s, [a])
    slow_down(live, 0.3)
    body, headers = request_for(a)
    responses = asyncio.run(burst(live.url, f"/v2/models/{a.name}/infer", body, headers, 12))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "3"
    assert "max_queue_size=1" in refused.json()["error"]
    assert live.state.metrics.requests.value(model=a.name, outcome="overloaded") >= 1
    with httpx.Client(base_url=live.url) as c:
        assert c.post(f"/v2/models/{a.name}/infer", content=body, headers=headers).is_success


def test_server_side_deadline_gives_504_and_the_server_stays_healthy(a, live_server):
    live = live_server(server_settings(a, request_timeout_s=0.15, warmup=False), [a])
    slow_down(live, 0.5)
    body, headers = request_for(a)
    with httpx.Client(base_url=live.url, timeout=10) as c:
        start = time.perf_counter()
        r = c.post(f"/v2/models/{a.name}/infer", content=body, headers=headers)
        assert r.status_code == 504 and "deadline" in r.json()["error"]
        assert time.perf_counter() - start < 0.45  # answered at the deadline, not after
        assert c.get("/v2/health/ready").status_code == 200
        assert live.state.metrics.requests.value(model=a.name, outcome="timeout") == 1


def test_not_ready_until_warmed_up(a, monkeypatch, live_server):
    release = threading.Event()
    original = ServedModel.warmup

    def gated(self):
        release.wait(20)
        original(self)

    monkeypatch.setattr(ServedModel, "warmup", gated)
    live = live_server(server_settings(a), [a], wait=False)
    with httpx.Client(base_url=live.url, timeout=10) as c:
        assert c.get("/v2/health/live").status_code == 200
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert c.get(f"/v2/models/{a.name}/ready").status_code == 503
        body, headers = request_for(a)
        r = c.post(f"/v2/models/{a.name}/infer", content=body, headers=headers)
        assert r.status_code == 503 and "warming up" in r.json()["error"]
        release.set()
        live.wait_ready(30)
        assert c.post(f"/v2/models/{a.name}/infer", content=body, headers=headers).is_success


def test_loading_in_the_background_then_ready(a, live_server):
    live = live_server(server_settings(a, warmup=False), bundles=None)
    with httpx.Client(base_url=live.url) as c:
        body, headers = request_for(a)
        assert c.post(f"/v2/models/{a.name}/infer", content=body, headers=headers).is_success


def test_graceful_shutdown_finishes_in_flight_and_refuses_new_requests(a, live_server):
    live = live_server(server_settings(a, drain_s=0.6, warmup=False, max_batch_size=1), [a])
    slow_down(live, 0.3)
    body, headers = request_for(a)
    path = f"/v2/models/{a.name}/infer"

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as c:
            in_flight = [
                asyncio.create_task(c.post(path, content=body, headers=headers)) for _ in range(3)
            ]
            await asyncio.sleep(0.1)  # all three accepted; one runs, two queue
            live.server.handle_exit(signal.SIGTERM, None)
            await asyncio.sleep(0.05)
            late = await c.post(path, content=body, headers=headers)
            ready = await c.get("/v2/health/ready")
            alive = await c.get("/v2/health/live")
            return await asyncio.gather(*in_flight), late, ready, alive

    done, late, ready, alive = asyncio.run(main())
    assert [r.status_code for r in done] == [200, 200, 200]
    assert late.status_code == 503 and "shutting down" in late.json()["error"]
    assert late.headers["retry-after"] == "1"
    assert ready.status_code == 503 and alive.status_code == 200
    live.join(15)  # SIGTERM ended uvicorn's thread
    assert live.state.phase == "stopped"


def test_binary_request_header_length_is_validated_before_reading_frames(a, live_server):
    live = live_server(server_settings(a, warmup=False), [a])
    with httpx.Client(base_url=live.url) as c:
        body, headers = request_for(a)
        r = c.post(
            f"/v2/models/{a.name}/infer",
            content=body,
            headers={**headers, HEADER_LENGTH: str(len(body) * 2)},
        )
        assert r.status_code == 400 and HEADER_LENGTH in r.json()["error"]
