"""Goodput under overload: the tail server offered 4x its capacity by a native load generator.

    core LOAD_CPU: h2load (nghttp2's, C; HTTP/1.1 keep-alive, one request in flight per client)
        │ 127.0.0.1 only
        ▼
    core SERVER_CPU: splitexit-server (one process, one torch thread), admission control on

    1. unloaded:  1 client, closed loop                       -> p99 of an answer alone
    2. capacity:  16 clients, closed loop                     -> answers/s the server sustains
    3. overload:  64 clients, open loop at 4x capacity in all -> answers/s, their p99, statuses

Goal (issue 14): under overload, answers at least 80% of capacity, their p99 at most
2 x the unloaded p99 + the queue-delay target, no 5xx, resident memory bounded. The request
is what a device sends: one real frame of the bundle at its best operating point, binary
extension (`splitexit.protocol.kserve.encode_request`). h2load writes one line per request (start,
status, duration), so answers and refusals are timed apart.

Run (Debian: `apt-get install nghttp2-client`; needs two cores):
    python benchmarks/overload.py                         # the zoo's fmnist-small bundle
    python benchmarks/overload.py --duration 30 --target-ms 20
Writes benchmarks/results/overload.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import run_h2load
from server_throughput import make_frames

from splitexit.demo import free_port
from splitexit.processes import server_process, wait_ready

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
LOOPBACK = "127.0.0.1"  # the only address this benchmark sends to
DEFAULT_BUNDLE = ROOT / "splitexit" / "zoo" / "fmnist-small"


@contextlib.contextmanager
def serving(args: argparse.Namespace, port: int, log: Path) -> Iterator[subprocess.Popen]:
    """The server on its core for the block (its own process group, stopped however the
    block ends)."""
    cmd = [
        "taskset", "-c", str(args.server_cpu),
        sys.executable, "-W", "ignore", "-m", "splitexit_server.cli", "--bundle", str(args.bundle),
        "--host", LOOPBACK, "--port", str(port), "--no-images", "--threads", "1",
        "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", "2",
        "--queue-delay-target-ms", str(args.target_ms), "--log-level", "warning",
    ]  # fmt: skip
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}  # keep the caller's path too
    with (
        log.open("wb") as out,
        server_process(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out) as proc,
    ):
        wait_ready(f"http://{LOOPBACK}:{port}/v2/health/ready", proc, log)
        yield proc


class RSSSampler:
    """Samples a process's resident memory every 0.2 s in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        for line in self.path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, self.now())
            except OSError:
                return

    def reset(self) -> None:
        self.peak = self.now()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)


def h2load(
    args: argparse.Namespace,
    url: str,
    body: Path,
    header_length: int,
    clients: int,
    seconds: float,
    rps: float | None,
    log: Path,
) -> dict[str, Any]:
    """One h2load run (`loadgen.run_h2load`); returns what its per-request log says."""
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }
    _, cmd = run_h2load(url, body, headers, clients, seconds, log, rps=rps, cpu=args.load_cpu)
    rows = np.loadtxt(log, dtype=np.int64, ndmin=2) if log.stat().st_size else np.zeros((0, 3))
    status, micros = rows[:, 1], rows[:, 2] / 1e3  # ms
    span = seconds
    ok, refused = micros[status == 200], micros[status == 429]

    def pct(x: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(x, q)), 2) if len(x) else None

    codes = {int(c): int(n) for c, n in zip(*np.unique(status, return_counts=True), strict=True)}
    return {
        "clients": clients,
        "seconds": seconds,
        "rps_per_client": rps,
        "offered_per_s": round(len(status) / span, 1),
        "answers_per_s": round(len(ok) / span, 1),
        "statuses": codes,
        "answer_p50_ms": pct(ok, 50),
        "answer_p99_ms": pct(ok, 99),
        "refusal_p50_ms": pct(refused, 50),
        "refusal_p99_ms": pct(refused, 99),
        "server_errors": int(sum(n for c, n in codes.items() if c >= 500)),
        "command": " ".join(cmd).replace(str(body), "body.bin"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("h2load") is None or shutil.which("taskset") is None:
        raise SystemExit("needs h2load and taskset: apt-get install nghttp2-client util-linux")
    from splitexit.protocol.kserve import encode_request

    name, frames, point = make_frames(args.bundle, n=1)
    deadline_us = None if args.deadline_ms is None else int(args.deadline_ms * 1e3)
    payload, header_length = encode_request(frames[0], None, deadline_us)
    port = free_port()
    url = f"http://{LOOPBACK}:{port}/v2/models/{name}/infer"
    with tempfile.TemporaryDirectory(prefix="splitexit-overload-") as tmp:
        body = Path(tmp) / "body.bin"
        body.write_bytes(payload)
        with serving(args, port, Path(tmp) / "server.log") as proc:
            rss = RSSSampler(proc.pid)
            try:
                baseline_rss = rss.now()
                load_before = os.getloadavg()[0]
                phases = {}
                print("unloaded ...", flush=True)
                phases["unloaded"] = h2load(
                    args, url, body, header_length, 1, args.short_s, None, Path(tmp) / "u.log"
                )
                print("capacity ...", flush=True)
                phases["capacity"] = h2load(
                    args, url, body, header_length, 16, args.short_s * 2, None, Path(tmp) / "c.log"
                )
                capacity = phases["capacity"]["answers_per_s"]
                clients = args.clients
                rps = math.ceil(args.factor * capacity / clients)
                print(
                    f"overload: {clients} clients x {rps} req/s, {args.duration} s ...", flush=True
                )
                rss.reset()
                phases["overload"] = h2load(
                    args, url, body, header_length, clients, args.duration, rps, Path(tmp) / "o.log"
                )
                peak_rss = rss.peak
                load_after = os.getloadavg()[0]
            finally:
                rss.close()
    o, u = phases["overload"], phases["unloaded"]
    p99_bound = 2 * (u["answer_p99_ms"] or 0.0) + args.target_ms
    goals = {
        "answers_at_least_80pct_of_capacity": o["answers_per_s"] >= 0.8 * capacity,
        "answer_p99_within_2x_unloaded_plus_target": (o["answer_p99_ms"] or 0.0) <= p99_bound,
        "no_5xx": all(p["server_errors"] == 0 for p in phases.values()),
        "rss_growth_under_200_mb": peak_rss - baseline_rss < 200 * 2**20,
    }
    return {
        "bundle": str(_relative(args.bundle)),
        "model": name,
        "operating_point": {"channels": point[0], "bits": point[1]},
        "request_bytes": len(payload),
        "settings": {
            "queue_delay_target_ms": args.target_ms,
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": 2.0,
            "threads": 1,
            "deadline_ms": args.deadline_ms,
            "server_cpu": args.server_cpu,
            "load_cpu": args.load_cpu,
        },
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "http_parser": _installed("httptools") or "h11",
            "event_loop": _installed("uvloop") or "asyncio",
            "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
        },
        "phases": phases,
        "capacity_per_s": capacity,
        "overload_factor": round(o["offered_per_s"] / capacity, 2) if capacity else None,
        "answers_pct_of_capacity": (
            round(100 * o["answers_per_s"] / capacity, 1) if capacity else None
        ),
        "p99_bound_ms": round(p99_bound, 2),
        "rss_mb": {"baseline": round(baseline_rss / 2**20, 1), "peak": round(peak_rss / 2**20, 1)},
        "goals": goals,
    }


def _installed(package: str) -> str | None:
    """`package==version` if installed (the server extra brings httptools and uvloop)."""
    from importlib import metadata

    try:
        return f"{package}=={metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return None


def _relative(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        "# Overload: goodput at 4x capacity",
        "",
        f"`python benchmarks/overload.py` — bundle `{doc['bundle']}` ({doc['model']}, "
        f"k={doc['operating_point']['channels']}, {doc['operating_point']['bits']} bits, "
        f"{doc['request_bytes']}-byte request); server on core {s['server_cpu']} (1 torch "
        f"thread, max batch {s['max_batch_size']}, queue-delay target "
        f"{s['queue_delay_target_ms']:g} ms), h2load on core {s['load_cpu']}; "
        f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores; uvicorn with "
        f"{doc['machine'].get('http_parser')} and {doc['machine'].get('event_loop')}; "
        f"load average {_load(doc)} (its own two busy processes included).",
        "",
        "| phase | clients | offered/s | answers/s | answer p50 ms | answer p99 ms | "
        "429 p50 ms | 429 p99 ms | statuses |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, p in doc["phases"].items():
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(p["statuses"].items()))
        lines.append(
            f"| {name} | {p['clients']} | {p['offered_per_s']} | {p['answers_per_s']} | "
            f"{p['answer_p50_ms']} | {p['answer_p99_ms']} | {p['refusal_p50_ms']} | "
            f"{p['refusal_p99_ms']} | {codes} |"
        )
    g = doc["goals"]
    mark = {True: "met", False: "**not met**"}
    lines += [
        "",
        f"Capacity {doc['capacity_per_s']} answers/s; overload offered "
        f"{doc['overload_factor']}x that; answers {doc['answers_pct_of_capacity']}% of capacity. "
        f"Resident memory {doc['rss_mb']['baseline']} MB before, {doc['rss_mb']['peak']} MB at "
        "the peak of the overload.",
        "",
        "| goal | |",
        "| --- | --- |",
        f"| answers >= 80% of capacity | {mark[g['answers_at_least_80pct_of_capacity']]} |",
        f"| answer p99 <= 2 x unloaded p99 + target = {doc['p99_bound_ms']} ms | "
        f"{mark[g['answer_p99_within_2x_unloaded_plus_target']]} |",
        f"| no 5xx | {mark[g['no_5xx']]} |",
        f"| RSS growth < 200 MB | {mark[g['rss_growth_under_200_mb']]} |",
        "",
        *_cost_note(doc),
        "Commands (h2load's per-request log gives each status its own latency; body.bin is one",
        "device request, `splitexit.protocol.kserve.encode_request`):",
        "",
        *[f"- {n}: `{p['command'].split(' --log-file')[0]} URL`" for n, p in doc["phases"].items()],
        "",
    ]
    return "\n".join(lines)


def _load(doc: dict[str, Any]) -> str:
    load = doc["machine"].get("load_average_1min") or {}
    return f"{load.get('before')} before, {load.get('after')} after"


def _cost_note(doc: dict[str, Any]) -> list[str]:
    """What a refusal costs the server's core, from the numbers: an answer costs 1/capacity
    of a core-second; the refusals had what the answers left of it."""
    o, capacity = doc["phases"]["overload"], doc["capacity_per_s"]
    refusals = o["statuses"].get(429, 0) / o["seconds"]
    if not capacity or not refusals:
        return []
    answer_ms = 1e3 / capacity
    refusal_ms = max(0.0, 1e3 - o["answers_per_s"] * answer_ms) / refusals
    share = refusals * refusal_ms / 10
    return [
        f"Where the core goes: one core runs the event loop and the model. An answer costs it "
        f"{answer_ms:.2f} ms (1 / capacity), so the {refusals:.0f} refusals/s had the rest: "
        f"{refusal_ms:.3f} ms each ({100 * refusal_ms / answer_ms:.0f}% of an answer: reading "
        "the request and writing the door's prebuilt 429, `server/connection.py`), "
        f"{share:.0f}% of the core in all. Every answer also waits behind them on the event "
        "loop; the door keeps what it admits within the target (`server/admission.py`).",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--duration", type=float, default=30.0, help="overload phase, seconds (30)")
    p.add_argument("--short-s", type=float, default=5.0, help="unloaded phase, seconds (5)")
    p.add_argument("--factor", type=float, default=4.0, help="overload, x capacity (4)")
    p.add_argument("--clients", type=int, default=64, help="overload clients (64)")
    p.add_argument("--target-ms", type=float, default=20.0, help="queue-delay target (20)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--deadline-ms", type=float, help="send this timeout with each request")
    p.add_argument("--server-cpu", type=int, default=1)
    p.add_argument("--load-cpu", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.bundle = args.bundle.resolve()
    doc = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = report(doc)
    (args.out / "overload.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
