"""Closed-loop load generators for the tail server, each its own process on its own core, so
that the client does not eat the server's CPU.

    h2load_load  HTTP/1.1 keep-alive, one request in flight per client: nghttp2's h2load (C),
                 `taskset -c CPU`; its per-request log gives p50 / p99
    stream_load  WebSocket streams, one message in flight per connection: this file run as a
                 process (`taskset -c CPU`), the `websockets` client on uvloop when installed;
                 handshake (`splitexit.protocol.stream`), then pre-encoded messages

Both measure `seconds` after `warmup_s` of the same load and return one `Load` row: answers/s,
p50 / p99 of the answers (ms), errors (any other status, a "busy" or error answer, a
failed connection).

Run alone (what `stream_load` starts; SPEC is JSON: url, session, messages in base64):
    python benchmarks/loadgen.py SPEC --connections 16 --duration 3 --warmup 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np


class Load(TypedDict):
    """One measured cell: answers (2xx / stream answers) and the rest, over the measured time."""

    requests: int
    ok: int
    errors: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None


def summarize(latencies_s: Any, errors: int, seconds: float) -> Load:
    """The `Load` row of answers taking `latencies_s` (seconds) and `errors` others."""
    lat = np.asarray(latencies_s, dtype=np.float64) * 1e3
    ok = len(lat)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 2) if ok else None

    return {
        "requests": ok + errors,
        "ok": ok,
        "errors": errors,
        "rps": round(ok / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
    }


# ------------------------------------------------------------------------------ h2load

_FINISHED = re.compile(r"finished in [\d.]+(us|ms|s),")  # warm-up included
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_REQUESTS = re.compile(r"requests: (\d+) total, .*?(\d+) failed, (\d+) errored, (\d+) timeout")


def parse_h2load(stdout: str, log: str, seconds: float) -> Load:
    """h2load's summary (failed requests) and its `--log-file` (one line per request of the
    measured `seconds`, warm-up excluded: start µs, status, duration µs) as a `Load` row.
    Raises ValueError on output that is not h2load's."""
    if _FINISHED.search(stdout) is None or _STATUS.search(stdout) is None:
        raise ValueError(f"not h2load's summary: {stdout[-500:]!r}")
    rows = [line.split("\t") for line in log.splitlines() if line.strip()]
    ok = [int(r[2]) / 1e6 for r in rows if 200 <= int(r[1]) < 300]
    requests = _REQUESTS.search(stdout)
    failed = 0 if requests is None else int(requests[2])  # errored and timeouts are failed too
    return summarize(ok, len(rows) - len(ok) + failed, seconds)


def run_h2load(
    url: str,
    body: Path,
    headers: dict[str, str],
    clients: int,
    seconds: float,
    log: Path,
    *,
    warmup_s: float = 0.0,
    rps: float | None = None,
    cpu: int = 0,
) -> tuple[str, list[str]]:
    """`clients` h2load clients (one thread, `-m 1`) POSTing the file `body` to `url` for
    `seconds` after `warmup_s` (each client at `rps` requests/s, None: closed loop), h2load
    pinned to core `cpu`, one line per measured request in `log`; returns its summary
    (stdout) and the command. Raises RuntimeError if h2load fails."""
    cmd = [
        "taskset", "-c", str(cpu), "h2load", "--h1", "-c", str(clients), "-m", "1",
        "-t", "1", "-D", f"{round(seconds * 1e3)}ms", "-d", str(body), "--log-file", str(log),
    ]  # fmt: skip
    if warmup_s > 0:
        cmd += ["--warm-up-time", f"{round(warmup_s * 1e3)}ms"]
    if rps is not None:
        cmd += ["--rps", f"{rps:g}"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(url)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout, cmd


def h2load_load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    clients: int,
    seconds: float,
    *,
    warmup_s: float = 1.0,
    cpu: int = 0,
) -> Load:
    """`run_h2load` closed loop on `body`, as a `Load` row."""
    with tempfile.TemporaryDirectory(prefix="splitexit-h2load-") as tmp:
        data, log = Path(tmp) / "body.bin", Path(tmp) / "requests.log"
        data.write_bytes(body)
        stdout, _ = run_h2load(
            url, data, headers, clients, seconds, log, warmup_s=warmup_s, cpu=cpu
        )
        return parse_h2load(stdout, log.read_text() if log.exists() else "", seconds)


# ------------------------------------------------------------------------------ stream


def stream_load(
    url: str,
    session: str,
    messages: list[bytes],
    connections: int,
    seconds: float,
    *,
    warmup_s: float = 1.0,
    cpu: int = 0,
) -> Load:
    """`connections` streams to `url` (ws://…/stream) with handshake `session`, each sending
    `messages` in turn, one in flight, for `seconds` after `warmup_s`: this file as a process
    pinned to core `cpu`."""
    spec = {
        "url": url,
        "session": session,
        "messages": [base64.b64encode(m).decode() for m in messages],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="splitexit-stream-") as f:
        json.dump(spec, f)
        f.flush()
        cmd = [
            "taskset", "-c", str(cpu), sys.executable, str(Path(__file__).resolve()), f.name,
            "--connections", str(connections), "--duration", f"{seconds:g}",
            "--warmup", f"{warmup_s:g}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"the stream load failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


class _Clock:
    """When the measured window opens and closes (set once every stream is open)."""

    def __init__(self, connections: int) -> None:
        self.waiting = connections
        self.go = asyncio.Event()
        self.measure_from = self.stop = float("inf")


async def _stream(
    url: str,
    session: str,
    messages: list[bytes],
    offset: int,
    clock: _Clock,
    warmup_s: float,
    seconds: float,
    latencies: list[float],
    errors: list[int],
) -> None:
    from websockets.asyncio.client import connect

    from splitexit.protocol.stream import SUBPROTOCOL, Accepted

    try:
        async with connect(
            url, subprotocols=[SUBPROTOCOL], compression=None, ping_interval=None, max_size=2**20
        ) as ws:
            await ws.send(session)
            Accepted.decode(await ws.recv())  # raises on a refusal
            clock.waiting -= 1
            if clock.waiting == 0:  # the last stream open starts the clock for all
                now = time.perf_counter()
                clock.measure_from, clock.stop = now + warmup_s, now + warmup_s + seconds
                clock.go.set()
            await clock.go.wait()
            n, i = len(messages), offset
            send, recv, perf = ws.send, ws.recv, time.perf_counter
            while (start := perf()) < clock.stop:
                await send(messages[i % n])
                reply = await recv()
                end = perf()
                i += 1
                if start < clock.measure_from or end > clock.stop:
                    continue
                if isinstance(reply, bytes):
                    latencies.append(end - start)
                else:  # a "busy" or error answer (text)
                    errors[0] += 1
    except Exception as e:  # a refused or dropped stream: counted, and the others go on
        print(f"stream {offset}: {type(e).__name__}: {e}", file=sys.stderr)
        errors[0] += 1
        if not clock.go.is_set():
            clock.waiting -= 1
            if clock.waiting == 0:
                clock.go.set()


async def _run_streams(
    spec: dict[str, Any], connections: int, seconds: float, warmup_s: float
) -> Load:
    messages = [base64.b64decode(m) for m in spec["messages"]]
    clock, latencies, errors = _Clock(connections), [], [0]
    common = (spec["url"], spec["session"], messages)
    times = (clock, warmup_s, seconds, latencies, errors)
    await asyncio.gather(*(_stream(*common, i * 7, *times) for i in range(connections)))
    return summarize(latencies, errors[0], seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("spec", type=Path, help="JSON: url, session, messages (base64)")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    args = p.parse_args(argv)
    try:
        spec = json.loads(args.spec.read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read the spec {args.spec}: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    load = runner(_run_streams(spec, args.connections, args.duration, args.warmup))
    print(json.dumps(load))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
