"""Tail-server throughput: requests/s and p50/p99 latency versus concurrency, batching off and
on, splitexit's server side by side with LitServe serving the same TorchScript tail.

    this process: load generator (keep-alive HTTP/1.1 over asyncio streams, prebuilt requests;
        │          WebSockets with the `websockets` client, prebuilt messages)
        │ loopback
        ├─► splitexit-server (subprocess)   POST /v2/models/NAME/infer  binary extension
        │                                   POST /v2/models/NAME/infer  JSON, frame in base64
        │                                   WS   /v2/models/NAME/stream one stream per client
        └─► LitServe (subprocess)           POST /predict               JSON, frame in base64

Every server runs one tail per model, the same torch thread count, and the same batching
settings (max batch size, max queue delay 2 ms); "batching off" is max batch size 1. The
frames are real frames of the bundle (seeded random inputs through the head) at its best
operating point, so the work per request is what a device would cause.

Run:
    python benchmarks/server_throughput.py                       # bundles built on the fly
    python benchmarks/server_throughput.py --bundle path/to/bundle --duration 5
Writes benchmarks/results/server_throughput.{md,json}. LitServe is optional
(`pip install litserve`); without it only splitexit's rows are measured.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.demo import free_port
from splitexit.processes import server_process, wait_ready

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
LOOPBACK = "127.0.0.1"
CONCURRENCY = (1, 4, 16, 64)
BATCH_SIZES = (1, 32)  # 1: batching off
QUEUE_DELAY_MS = 2.0
FRAMES = 64
TRACKS = {
    "tiny": "built on the fly: the test suite's tiny model (small_resnet w=8, cut after layer2, "
    "C=4 x 4x4 code), random weights",
    "small": "built on the fly: the fmnist-small architecture (small_resnet w=32, cut after "
    "layer1, C=12 x 4x4 code), random weights (same compute as the trained model)",
}


# ---------------------------------------------------------------------------- bundles


def build_bundle(dest: Path, track: str) -> Path:
    """A bundle with random weights and the shape of a track's model (compute is the same)."""
    import torch

    from splitexit.bundle import export_bundle
    from splitexit.models import build_model
    from splitexit.splitnet import SplitExitNet

    torch.manual_seed(0)
    if track == "small":  # the fmnist-small architecture (splitexit/configs/fmnist-small.toml)
        teacher = build_model("small_resnet", width=32)
        kw = {"channels": 12, "hidden": 48, "downsample": 2, "exit_points": ("layer1",)}
        split = "layer1"
    else:  # "tiny": the test suite's bundle
        teacher = build_model("small_resnet", width=8)
        kw = {"channels": 4, "hidden": 8, "exit_points": ("layer1",)}
        split = "layer2"
    net = SplitExitNet.from_teacher(teacher, split, input_shape=(1, 28, 28), **kw).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_bundle(
            net,
            dest,
            name=f"{track}-random",
            architecture={"model": "small_resnet", "track": track},
            preprocessing={"size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]},
            class_names=[str(i) for i in range(10)],
            example_input_shape=(1, 28, 28),
            overwrite=True,
        )
    return dest


def make_frames(bundle_path: Path, n: int = FRAMES) -> tuple[str, list[bytes], tuple[int, int]]:
    """Model name, n real frames at the best operating point, and that point (k, bits)."""
    import torch

    from splitexit.bundle import load_bundle
    from splitexit.runtime import HeadRunner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = load_bundle(bundle_path, parts=("head", "exits"))
    head = HeadRunner(bundle)
    m = bundle.manifest
    measured = [p for p in m.operating_points if p.accuracy is not None]
    if measured:
        best = max(measured, key=lambda p: p.accuracy)
        k, bits = best.channels, best.bits
    else:
        k, bits = m.bottleneck.channels, max(m.bottleneck.bits)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *m.input_shape), generator=g)
    z = head.run(x, exits=False).z
    assert z is not None
    return m.name, [head.frame(z[i : i + 1], bits, k) for i in range(n)], (k, bits)


# ---------------------------------------------------------------------------- servers


@contextlib.contextmanager
def running(cmd: list[str], port: int, ready_path: str, log: Path) -> Iterator[None]:
    """The server `cmd` ready on `port` while the block runs, in its own process group, which
    is stopped and waited for however the block ends (Ctrl-C, an error): LitServe forks
    workers that outlive a signal to their parent alone."""
    with (
        log.open("wb") as err,
        server_process(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err) as proc,
    ):
        wait_ready(f"http://{LOOPBACK}:{port}{ready_path}", proc, log)
        yield


def start_splitexit(
    bundle: Path, port: int, max_batch: int, threads: int, log: Path
) -> contextlib.AbstractContextManager[None]:
    cmd = [
        sys.executable, "-W", "ignore", "-m", "splitexit_server.cli", "--bundle", str(bundle),
        "--host", LOOPBACK, "--port", str(port), "--max-batch-size", str(max_batch),
        "--max-queue-delay-ms", str(QUEUE_DELAY_MS), "--max-queue-size", "1024",
        "--threads", str(threads), "--log-level", "warning", "--no-images",
    ]  # fmt: skip
    return running(cmd, port, "/v2/health/ready", log)


def start_litserve(
    bundle: Path, port: int, max_batch: int, threads: int, log: Path
) -> contextlib.AbstractContextManager[None]:
    cmd = [
        sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--serve-litserve",
        "--bundle", str(bundle), "--port", str(port), "--max-batch", str(max_batch),
        "--torch-threads", str(threads),
    ]  # fmt: skip
    return running(cmd, port, "/health", log)


try:  # optional: only the LitServe rows need it
    import litserve as ls
except ImportError:  # pragma: no cover
    ls = None

if ls is not None:

    class TailAPI(ls.LitAPI):
        """LitServe serving a bundle's TorchScript tail, frames in base64 JSON (module level:
        LitServe pickles it into its worker process)."""

        def __init__(self, bundle: str, threads: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.bundle_path = bundle
            self.threads = threads

        def setup(self, device: str) -> None:
            import torch

            from splitexit.bundle import load_bundle
            from splitexit.runtime import TailRunner

            torch.set_num_threads(self.threads)
            self.runner = TailRunner(load_bundle(self.bundle_path, parts=("tail",)))

        def decode_request(self, request):  # no annotation: LitServe reads JSON then
            return base64.b64decode(request["frame"])

        def batch(self, inputs: list[bytes]) -> list[bytes]:
            return list(inputs)

        def predict(self, frames: Any) -> Any:
            single = isinstance(frames, bytes)
            answers = self.runner.run_frames([frames] if single else frames)
            out = [(int(a.prediction[0]), float(a.probability[0])) for a in answers]
            return out[0] if single else out

        def unbatch(self, output: list[Any]) -> list[Any]:
            return list(output)

        def encode_response(self, output: tuple[int, float]) -> dict[str, Any]:
            return {"class": output[0], "probability": output[1]}


def serve_litserve(bundle: Path, port: int, max_batch: int, threads: int) -> None:
    """Run LitServe on the bundle's TorchScript tail (in its own process)."""
    api = TailAPI(
        str(bundle), threads, max_batch_size=max_batch, batch_timeout=QUEUE_DELAY_MS / 1000
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30)
    server.run(host=LOOPBACK, port=port, log_level="warning", generate_client_file=False)


# ---------------------------------------------------------------------- load generator


def http_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {LOOPBACK}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _client(
    port: int, requests: list[bytes], offset: int, stop_at: float, out: dict[str, list]
) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        i = offset
        for _ in range(1_000_000):  # bounded; the clock stops it first
            if time.perf_counter() >= stop_at:
                break
            start = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
            out["latency"].append(time.perf_counter() - start)
            out["status"].append(status)
            i += 1
    finally:
        writer.close()


async def _stream_client(
    port: int, requests: list[bytes], offset: int, stop_at: float, out: dict[str, list]
) -> None:
    """One device's stream: requests[0] is the handshake's URL path and session, then the
    messages; an answer counts as 200, a "busy" or other error answer as 429."""
    from websockets.asyncio.client import connect

    from splitexit.protocol.stream import SUBPROTOCOL

    path, session = json.loads(requests[0])
    messages = requests[1:]
    url = f"ws://{LOOPBACK}:{port}{path}"
    async with connect(
        url, subprotocols=[SUBPROTOCOL], compression=None, ping_interval=None, max_size=2**20
    ) as ws:
        await ws.send(session)
        await ws.recv()
        i = offset
        for _ in range(1_000_000):
            if time.perf_counter() >= stop_at:
                break
            start = time.perf_counter()
            await ws.send(messages[i % len(messages)])
            reply = await ws.recv()
            out["latency"].append(time.perf_counter() - start)
            out["status"].append(200 if isinstance(reply, bytes) else 429)
            i += 1


def stream_requests(bundle: Path, name: str, frames: list[bytes], point: tuple[int, int]) -> list:
    """The stream's "requests": its path and handshake, then one message per frame."""
    from splitexit.bundle.manifest import read_manifest
    from splitexit.protocol.stream import message_from_frame, session_for

    m = read_manifest(bundle)
    session = session_for(name, m.fingerprint, m.bottleneck.code_shape, [point])
    head = json.dumps([f"/v2/models/{name}/stream", session.encode()]).encode()
    return [head, *(message_from_frame(f, 0, session) for f in frames)]


async def measure(
    port: int, requests: list[bytes], concurrency: int, seconds: float, client: Any = _client
) -> dict:
    warm: dict[str, list] = {"latency": [], "status": []}
    stop_warm = time.perf_counter() + min(1.0, seconds / 4)
    await asyncio.gather(*(client(port, requests, i, stop_warm, warm) for i in range(concurrency)))
    out: dict[str, list] = {"latency": [], "status": []}
    start = time.perf_counter()
    await asyncio.gather(
        *(client(port, requests, i * 7, start + seconds, out) for i in range(concurrency))
    )
    elapsed = time.perf_counter() - start
    lat = np.asarray(out["latency"]) * 1000
    ok = sum(1 for s in out["status"] if s == 200)
    return {
        "requests": len(lat),
        "ok": ok,
        "errors": len(lat) - ok,
        "rps": round(ok / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
    }


# ------------------------------------------------------------------------------ main


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    from importlib import metadata

    versions = {}
    for package in ("fastapi", "uvicorn", "uvloop", "httptools", "litserve"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "packages": versions,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    have_litserve = ls is not None
    if not have_litserve:
        print("litserve not installed: measuring splitexit only", file=sys.stderr)
    bundles = list(args.bundle or [])
    with tempfile.TemporaryDirectory(prefix="splitexit-bench-") as tmp:
        return _run(args, bundles, Path(tmp), have_litserve)


def _run(
    args: argparse.Namespace, bundles: list[Path], tmp: Path, have_litserve: bool
) -> dict[str, Any]:
    described = {str(b): str(b) for b in bundles}
    if not bundles:
        bundles = [build_bundle(tmp / t, t) for t in args.tracks]
        described = {str(b): TRACKS[t] for b, t in zip(bundles, args.tracks, strict=True)}
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "duration_s": args.duration,
            "concurrency": list(args.concurrency),
            "max_batch_sizes": list(BATCH_SIZES),
            "max_queue_delay_ms": QUEUE_DELAY_MS,
            "torch_threads": args.torch_threads,
        },
        "bundles": [],
    }
    from splitexit.protocol.kserve import build_binary_request

    for bundle in bundles:
        name, frames, point = make_frames(bundle)
        path = f"/v2/models/{name}/infer"
        binary = []
        for f in frames:
            body, headers = build_binary_request("frame", [f], outputs=["class", "probability"])
            binary.append(http_request(path, body, headers))
        as_json = [
            http_request(
                path,
                json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "frame",
                                "shape": [1],
                                "datatype": "BYTES",
                                "data": [base64.b64encode(f).decode()],
                            }
                        ]
                    }
                ).encode(),
                {"Content-Type": "application/json"},
            )
            for f in frames
        ]
        lit = [
            http_request(
                "/predict",
                json.dumps({"frame": base64.b64encode(f).decode()}).encode(),
                {"Content-Type": "application/json"},
            )
            for f in frames
        ]
        entry: dict[str, Any] = {
            "bundle": described[str(bundle)],
            "model": name,
            "operating_point": list(point),
            "frame_bytes": round(statistics.mean(len(f) for f in frames), 1),
            "rows": [],
        }
        stream = stream_requests(bundle, name, frames, point)
        for max_batch in BATCH_SIZES:
            # (the server, then the rows it serves): each server stopped before the next starts
            plans: list[tuple[Any, list[tuple[str, list, Any]]]] = [
                (start_splitexit, [
                    ("splitexit (stream)", stream, _stream_client),
                    ("splitexit (binary)", binary, _client),
                    ("splitexit (JSON)", as_json, _client),
                ]),
            ]  # fmt: skip
            if have_litserve:
                plans.append((start_litserve, [("LitServe (JSON)", lit, _client)]))
            for starter, rows in plans:
                port = free_port()
                log = tmp / f"{starter.__name__}-{port}.log"
                with starter(bundle, port, max_batch, args.torch_threads, log):
                    for label, requests, client in rows:
                        for c in args.concurrency:
                            cell = asyncio.run(measure(port, requests, c, args.duration, client))
                            row = {"server": label, "max_batch": max_batch, "concurrency": c}
                            row.update(cell)
                            print(json.dumps(row), flush=True)
                            entry["rows"].append(row)
        results["bundles"].append(entry)
    return results


def write_markdown(results: dict[str, Any], path: Path, command: str) -> None:
    m = results["machine"]
    s = results["settings"]
    lines = [
        "# Tail server throughput",
        "",
        f"Generated by `{command}`.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}, "
        f"{m['platform']}; packages {m['packages']} (uvicorn picks uvloop and httptools when "
        "installed, for both servers); load average at start "
        f"{m['load_average_at_start']} (the machine is "
        "shared: other jobs ran at the same time, so absolute numbers are noisy; the servers "
        "were measured in the same run, one after the other).",
        "",
        f"Each cell: {s['duration_s']} s of closed-loop load (after a short warm-up) from this "
        f"process over loopback keep-alive connections, one request in flight per connection; "
        f"torch threads {s['torch_threads']}; max queue delay {s['max_queue_delay_ms']} ms. "
        "Batching off = max batch size 1, on = 32. Every request carries one real frame of the "
        "bundle at its best operating point. `splitexit (stream)` sends it as a stream message "
        "(one WebSocket per client, the `websockets` client library in this process, one "
        "message in flight each); `splitexit (binary)` uses the Open Inference "
        "Protocol binary-data extension; the JSON rows send the frame as base64 in JSON.",
        "",
    ]
    for b in results["bundles"]:
        lines += [
            f"## {b['model']} ({b['bundle']})",
            "",
            f"Operating point (k, bits) = {tuple(b['operating_point'])}, mean frame "
            f"{b['frame_bytes']} B.",
            "",
            "| server | batching | concurrency | req/s | p50 ms | p99 ms | errors |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in b["rows"]:
            batching = "off" if r["max_batch"] == 1 else f"on (max {r['max_batch']})"
            lines.append(
                f"| {r['server']} | {batching} | {r['concurrency']} | {r['rps']} | "
                f"{r['p50_ms']} | {r['p99_ms']} | {r['errors']} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, action="append", help="bundle(s) to serve")
    p.add_argument("--tracks", nargs="+", default=["tiny", "small"], help="built when no --bundle")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "server_throughput")
    p.add_argument("--serve-litserve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_litserve:
        serve_litserve(args.bundle[0], args.port, args.max_batch, args.torch_threads)
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # the servers are stopped on the way out
    try:
        results = run(args)
    except KeyboardInterrupt:
        print("interrupted: every server this run started is stopped", file=sys.stderr)
        return 130
    command = "python benchmarks/server_throughput.py " + " ".join(argv or sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out.with_suffix(".md"), command.strip())
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
