"""Load: N concurrent clients for a bounded time against two models. Every answer is right,
no 5xx, no 429 (the queue is sized for the clients), and memory stays bounded."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from support import OPERATING_POINTS, server_settings

from splitexit.protocol.kserve import HEADER_LENGTH, build_binary_request, decode_infer_response

CLIENTS = 16
DURATION_S = 3.0
MAX_REQUESTS_PER_CLIENT = 2000
RSS_GROWTH_LIMIT = 200 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRSS:
    """Samples this process's resident memory every 20 ms in a thread; keeps the peak."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_concurrent_clients_get_right_answers_without_5xx_or_429(
    record_property, tiny_bundles, live_server
):
    bundles = tiny_bundles
    cases = []
    for i in range(32):
        b = bundles[i % 2]
        k, bits = OPERATING_POINTS[i % len(OPERATING_POINTS)]
        frame = b.frame(b.inputs(1, seed=1000 + i), k, bits)
        body, headers = build_binary_request("frame", [frame], outputs=["class"])
        cases.append(
            (f"/v2/models/{b.name}/infer", body, headers, int(b.local(frame).prediction[0]))
        )

    s = server_settings(*bundles, max_batch_size=16, max_queue_delay_ms=2.0, max_queue_size=64)
    live = live_server(s, bundles)
    before = rss_bytes()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    wrong = 0

    async def client(i: int, deadline: float) -> None:
        nonlocal wrong
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
            for n in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() >= deadline:
                    return
                path, body, headers, want = cases[(i * 7 + n) % len(cases)]
                start = time.perf_counter()
                r = await c.post(path, content=body, headers=headers)
                latencies.append(time.perf_counter() - start)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    got = decode_infer_response(r.content, r.headers.get(HEADER_LENGTH))
                    wrong += int(got["class"][0] != want)

    async def main() -> None:
        deadline = time.monotonic() + DURATION_S
        await asyncio.gather(*(client(i, deadline) for i in range(CLIENTS)))

    with PeakRSS() as peak:
        start = time.perf_counter()
        asyncio.run(main())
        elapsed = time.perf_counter() - start
    total = sum(statuses.values())
    mean_batch = {
        b.name: live.state.metrics.inference_count.value(model=b.name)
        / max(1, live.state.metrics.execution_count.value(model=b.name))
        for b in bundles
    }
    report = {
        "clients": CLIENTS,
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2),
        "statuses": statuses,
        "mean_batch_size": {k: round(v, 2) for k, v in mean_batch.items()},
        "rss_before_mb": round(before / 2**20, 1),
        "peak_rss_mb": round(peak.peak / 2**20, 1),
    }
    print("load report:", report)
    for key, value in report.items():
        record_property(key, value)
    assert statuses.get(200, 0) == total and total >= CLIENTS, statuses
    assert wrong == 0
    assert peak.peak - before < RSS_GROWTH_LIMIT, report
    assert live.state.ready and live.state.models[bundles[0].name].batcher.pending == 0
