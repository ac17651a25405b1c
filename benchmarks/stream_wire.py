"""Bytes on the wire and round trips per offload: the stream against KServe v2 over HTTP.

    python benchmarks/stream_wire.py [--requests 100] [--rtt-requests 300] [--gap-ms 2]

Starts `splitexit-server` on the shipped small-track bundle (one torch thread, no batching
wait) in its own process, with uvicorn's fast HTTP parser and event loop (httptools, uvloop:
the `server` extra) and, for the last table, again with its pure-Python ones (h11, asyncio).

Bytes: the link emulator (`splitexit.link`, a TCP proxy, unshaped here) sits in front of the
server and counts TCP payload bytes each way. For every operating point of the bundle the
same real frames (the first `--requests` Fashion-MNIST test images through the head) go
through `device.OffloadClient` (HTTP keep-alive) and `device.StreamClient` (one WebSocket),
after a first request that opens the connection (and the stream's handshake); the table
gives bytes per offload against the frame's content (quantization parameters + packed
payload) and the stream's overhead over it. Keepalive pings are not in these numbers
(`--ping-s`, 60 s here; the device's default 1 s costs 16 B a second on an idle stream).

Round trips: one offload at a time, `--gap-ms` idle before each, straight to the server (no
emulator): median and p99 in ms, for each client and each server stack.

Writes benchmarks/results/stream_wire.md and stream_wire.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from suite.report import machine, machine_line

from splitexit.bundle import Bundle, load_bundle
from splitexit.data import load_fashion_mnist
from splitexit.demo import free_port
from splitexit.link import LinkEmulator
from splitexit.processes import server_process, wait_ready
from splitexit.protocol.stream import MESSAGE_HEADER_SIZE
from splitexit.runtime import HeadRunner
from splitexit.zoo import default_bundle_path
from splitexit_device.client import OffloadClient
from splitexit_device.config import operating_points
from splitexit_device.stream import StreamClient, StreamConfig, bundle_session

RESULTS = Path(__file__).resolve().parent / "results"
STACKS = {"httptools+uvloop": ("httptools", "uvloop"), "h11+asyncio": ("h11", "asyncio")}
_SERVE = """
import sys, uvicorn
from splitexit_server.app import create_app
from splitexit_server.model import load_bundles
from splitexit_server.serve import make_server
from splitexit_server.settings import Settings
s = Settings.from_env(bundles=(sys.argv[1],), port=int(sys.argv[2]), max_queue_delay_ms=0.0,
                      threads=1, log_level="warning")
server = make_server(create_app(s, bundles=load_bundles(s)), s)
server.config.http, server.config.loop = sys.argv[3], sys.argv[4]
server.run()
"""


@contextlib.contextmanager
def serve(bundle: Path, stack: str, log: Path) -> Iterator[str]:
    """The tail server on a free port with uvicorn's `stack`; yields its URL."""
    port = free_port()
    http, loop = STACKS[stack]
    cmd = [sys.executable, "-W", "ignore", "-c", _SERVE, str(bundle), str(port), http, loop]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITEXIT_SERVER_")}
    url = f"http://127.0.0.1:{port}"
    with (
        log.open("w") as out,
        server_process(cmd, stdout=out, stderr=subprocess.STDOUT, env=env) as proc,
    ):
        wait_ready(f"{url}/v2/health/ready", proc, log)
        yield url


def frames_for(bundle: Bundle, n: int) -> dict[tuple[int, int], list[bytes]]:
    images, _ = load_fashion_mnist("test")
    head = HeadRunner(bundle)
    with torch.inference_mode():
        z = head.run(bundle.preprocess(images[:n]), exits=False).z
    assert z is not None
    points = sorted({(p.channels, p.bits) for p in operating_points(bundle)})
    return {(k, b): [head.frame(z[i : i + 1], b, k) for i in range(n)] for k, b in points}


def clients(url: str, bundle: Bundle, ping_s: float) -> dict[str, Any]:
    model = bundle.manifest.name
    stream = StreamConfig(transport="stream", ping_interval_s=ping_s, ping_timeout_s=ping_s)
    return {
        "http": OffloadClient(url, model),
        "stream": StreamClient(OffloadClient(url, model), bundle_session(bundle, model), stream),
    }


async def wire_bytes(
    url: str, link: LinkEmulator, bundle: Bundle, frames: list[bytes], ping_s: float
) -> dict[str, dict[str, float]]:
    """Mean TCP payload bytes per offload, up and down, per client."""
    out: dict[str, dict[str, float]] = {}
    for name, client in clients(link.url, bundle, ping_s).items():
        async with client:
            await client.check_fingerprint(bundle.fingerprint)
            await client.infer(frames[0], "warm")
            await asyncio.sleep(0.05)
            up0, down0 = link.up.bytes, link.down.bytes
            for i, f in enumerate(frames):
                await client.infer(f, f"r{i:06d}")
            await asyncio.sleep(0.05)  # the proxy's threads have counted what they passed
            n = len(frames)
            out[name] = {"up": (link.up.bytes - up0) / n, "down": (link.down.bytes - down0) / n}
    return out


async def round_trips(
    url: str, bundle: Bundle, frame: bytes, n: int, gap_s: float, ping_s: float
) -> dict[str, dict[str, float]]:
    """Median and p99 ms of one offload at a time, per client."""
    out: dict[str, dict[str, float]] = {}
    for name, client in clients(url, bundle, ping_s).items():
        async with client:
            await client.check_fingerprint(bundle.fingerprint)
            times = []
            for i in range(n + 10):
                await asyncio.sleep(gap_s)
                start = time.perf_counter()
                await client.infer(frame, f"t{i:06d}")
                times.append(time.perf_counter() - start)
            times = sorted(times[10:])
            out[name] = {
                "p50_ms": statistics.median(times) * 1e3,
                "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3,
            }
    return out


def content(frame: bytes) -> int:
    """The frame's quantization parameters and packed payload: what the stream must carry."""
    return len(frame) - 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="frames per operating point")
    parser.add_argument("--rtt-requests", type=int, default=300, help="timed round trips")
    parser.add_argument("--gap-ms", type=float, default=2.0, help="idle before each round trip")
    parser.add_argument("--ping-s", type=float, default=60.0, help="stream keepalive interval")
    parser.add_argument("--bundle", type=Path, default=default_bundle_path())
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle, parts=("head", "exits"))
    frames = frames_for(bundle, args.requests)
    log = Path(tempfile.mkdtemp(prefix="splitexit-stream-wire-")) / "server.log"

    rows: list[dict[str, Any]] = []
    rtt: dict[str, Any] = {}
    widest = max(frames, key=lambda p: (p[0] * p[1], p))
    for stack in STACKS:
        with serve(args.bundle, stack, log) as url:
            if not rows:
                with LinkEmulator(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as link:
                    for point, fs in frames.items():
                        got = asyncio.run(wire_bytes(url, link, bundle, fs, args.ping_s))
                        body = statistics.fmean(content(f) for f in fs)
                        rows.append({"k": point[0], "bits": point[1], "frame": body + 32,
                                     "content": body, **{f"{c}_{d}": v for c, x in got.items()
                                                         for d, v in x.items()}})  # fmt: skip
                        r = rows[-1]
                        print(f"k={point[0]} bits={point[1]}: content {body:.1f} B, http "
                              f"{r['http_up'] + r['http_down']:.1f} B, stream "
                              f"{r['stream_up'] + r['stream_down']:.1f} B")  # fmt: skip
            frame = frames[widest][0]
            gap_s = args.gap_ms / 1e3
            rtt[stack] = asyncio.run(
                round_trips(url, bundle, frame, args.rtt_requests, gap_s, args.ping_s)
            )
            print(f"{stack}: {rtt[stack]}")

    m = machine()
    cmd = " ".join(["python benchmarks/stream_wire.py", *sys.argv[1:]])
    lines = [
        "# Stream against HTTP: bytes on the wire and round trips per offload",
        "",
        f"`{cmd}` on the `{bundle.manifest.name}` bundle; machine: {machine_line(m)}; "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}.",
        "",
        "## Bytes per offload (TCP payload, as the link emulator counted them)",
        "",
        f"Mean over {args.requests} Fashion-MNIST test images per operating point, after the "
        "connection (and the stream's handshake) was open. *content* is what must travel: "
        "the frame's quantization parameters and packed (zstd when smaller) payload; the "
        f"frame adds its 32-byte header, the stream message {MESSAGE_HEADER_SIZE} bytes (id, "
        "point) and the WebSocket framing (6-8 B up, 2 B down); the answer is id, class, "
        "probability (4 B). Goal: stream <= content + 16 B.",
        "",
        "| k | bits | content B | frame B | HTTP up | HTTP down | HTTP total | stream up "
        "| stream down | stream total | stream - content | HTTP / stream |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        http, stream = r["http_up"] + r["http_down"], r["stream_up"] + r["stream_down"]
        r["stream_overhead"] = stream - r["content"]
        lines.append(
            f"| {r['k']} | {r['bits']} | {r['content']:.1f} | {r['frame']:.1f} | "
            f"{r['http_up']:.1f} | {r['http_down']:.1f} | {http:.1f} | {r['stream_up']:.1f} | "
            f"{r['stream_down']:.1f} | {stream:.1f} | {r['stream_overhead']:+.1f} | "
            f"{http / stream:.1f}x |"
        )
    lines += [
        "",
        "## Round trip per offload (loopback, no emulator, one at a time)",
        "",
        f"One {len(frames[widest][0])}-byte frame (k={widest[0]}, {widest[1]} bits), "
        f"{args.rtt_requests} offloads after {args.gap_ms:g} ms idle each; the server's "
        "tail compute is in every row. Server stack: uvicorn's HTTP parser + event loop.",
        "",
        "| server stack | client | p50 ms | p99 ms |",
        "|---|---|---:|---:|",
    ]
    for stack, by_client in rtt.items():
        for name, t in by_client.items():
            lines.append(f"| {stack} | {name} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stream_wire.md").write_text("\n".join(lines) + "\n")
    doc = {"command": cmd, "machine": m, "bytes": rows, "round_trips": rtt}
    (RESULTS / "stream_wire.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS / 'stream_wire.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
