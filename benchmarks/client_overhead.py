"""What the device's clients cost: one frame to the tail server, four ways, same frame.

    python benchmarks/client_overhead.py [--requests 200] [--gap-ms 10]

Starts `splitexit-server` on the shipped small-track bundle (as the suite does: one runtime
thread, default batching) and times, closed loop with `--gap-ms` of idle between requests
(as the suite's inputs arrive), the median round trip of one real frame at the widest point
sent by: `device.StreamClient.infer` (the WebSocket stream), `device.OffloadClient.infer`
(KServe v2 over httpcore's pool, `splitexit_device.http`), a plain `httpx.AsyncClient.post`, and a
minimal keep-alive HTTP/1.1 exchange on an asyncio stream (no parsing beyond the
Content-Length): the floor a Python HTTP client can reach. Writes
benchmarks/results/client_overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from suite.report import machine, machine_line
from suite.services import tail_server
from suite.split_runs import widest_point

from splitexit.bundle import load_bundle
from splitexit.data import load_fashion_mnist
from splitexit.protocol.kserve import CONTENT_TYPE, HEADER_LENGTH, encode_request
from splitexit.runtime import HeadRunner
from splitexit.zoo import default_bundle_path
from splitexit_device.client import OffloadClient
from splitexit_device.stream import StreamClient, StreamConfig, bundle_session

RESULTS = Path(__file__).resolve().parent / "results"
Send = Callable[[int], Awaitable[None]]


async def timed(send: Send, n: int, gap_s: float) -> float:
    """Median ms of `n` calls of `send(i)`, each after `gap_s` idle (5 warm-ups first)."""
    times = []
    for i in range(n + 5):
        await asyncio.sleep(gap_s)
        start = time.perf_counter()
        await send(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:]) * 1e3


async def measure(
    url: str, model: str, frame: bytes, n: int, gap_s: float, computes: list[float]
) -> dict[str, float]:
    """Median ms per client; appends the server's reported compute (ms) to `computes`."""
    body, header_len = encode_request(frame, None, 1_000_000)
    path = f"/v2/models/{model}/infer"
    headers = {HEADER_LENGTH: str(header_len), "Content-Type": CONTENT_TYPE}
    out: dict[str, float] = {}

    stream = StreamConfig(transport="stream", ping_interval_s=60, ping_timeout_s=60)
    bundle = load_bundle(default_bundle_path(), parts=("head", "exits"))
    clients = {
        "device.StreamClient (WebSocket stream)": StreamClient(
            OffloadClient(url, model), bundle_session(bundle, model), stream
        ),
        "device.OffloadClient (KServe v2, httpcore)": OffloadClient(url, model),
    }
    for name, client in clients.items():
        async with client:
            await client.check_fingerprint(bundle.fingerprint)

            async def agent_client(i: int, client: Any = client) -> None:
                res = await client.infer(frame, f"r{i:06d}")
                if res.compute_s is not None:
                    computes.append(res.compute_s * 1e3)

            out[name] = await timed(agent_client, n, gap_s)

    async with httpx.AsyncClient(base_url=url) as http:

        async def plain_httpx(i: int) -> None:
            r = await http.post(path, content=body, headers={**headers, "X-Request-ID": str(i)})
            r.raise_for_status()

        out["httpx.AsyncClient.post"] = await timed(plain_httpx, n, gap_s)

    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    fixed = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    async def raw_stream(i: int) -> None:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            f"{fixed}X-Request-ID: {i}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        if b" 200 " not in lines[0]:
            raise RuntimeError(f"server answered {lines[0]!r}")
        sizes = [h.split(b":")[1] for h in lines if h.lower().startswith(b"content-length")]
        await reader.readexactly(int(sizes[0]))

    out["raw asyncio stream, HTTP/1.1 by hand"] = await timed(raw_stream, n, gap_s)
    writer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="timed requests per client")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="idle before each request")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the clients this often")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    bundle = load_bundle(default_bundle_path())
    images, _ = load_fashion_mnist("test")
    head = HeadRunner(bundle)
    with torch.inference_mode():
        z = head.run(bundle.preprocess(images[:1]), exits=False).z
    assert z is not None
    channels, bits = widest_point(bundle)
    frame = head.frame(z, bits, channels)

    rounds: list[dict[str, float]] = []
    computes: list[float] = []
    log = Path(tempfile.mkdtemp(prefix="splitexit-client-")) / "server.log"
    with tail_server(default_bundle_path(), log) as url:
        for r in range(args.rounds):
            m = bundle.manifest.name
            run = measure(url, m, frame, args.requests, args.gap_ms / 1e3, computes)
            rounds.append(asyncio.run(run))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in rounds[-1].items()))

    tail_ms = statistics.median(computes) if computes else float("nan")
    lines = [
        "# Device client overhead",
        "",
        f"`{' '.join(['python benchmarks/client_overhead.py', *sys.argv[1:]])}`",
        "",
        f"One {len(frame)}-byte frame (small track, k={channels}, {bits} bits) to "
        "`splitexit-server` on loopback, no link emulator; median round trip in ms over "
        f"{args.requests} requests, each after {args.gap_ms:g} ms idle; one column per round. "
        "Every row includes the server's own time (the tail's compute, about "
        f"{tail_ms:.1f} ms here, as the HTTP answers report it, and its HTTP or WebSocket "
        "stack): the differences between rows are the clients' and the protocols'.",
        "",
        f"Machine: {machine_line(machine())}; Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}.",
        "",
        "| client | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) + " |",
        "| --- | " + " | ".join("---:" for _ in rounds) + " |",
    ]
    for key in rounds[0]:
        lines.append(f"| {key} | " + " | ".join(f"{r[key]:.2f}" for r in rounds) + " |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "client_overhead.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
