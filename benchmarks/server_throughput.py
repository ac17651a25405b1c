"""Tail-server throughput: answers/s and p50/p99 latency versus concurrency, batching off and
on, splitexit's server side by side with LitServe serving the same tail (the same model).

    core LOAD_CPU (0): the load, its own process (`loadgen.py`), one request in flight per client
        │  h2load (C, HTTP/1.1 keep-alive)       POST /v2/models/NAME/infer  binary extension
        │  loadgen.py (websockets on uvloop)     WS   /v2/models/NAME/stream one per client
        │  h2load                                POST /predict               JSON, frame in base64
        │ loopback
    core SERVER_CPU (1): splitexit-server (torch or onnxruntime), then LitServe (torch; its API
                         server and its worker process), one at a time

Every server runs one tail per model, the same thread count, and the same batching settings
(max batch size, max queue delay 2 ms); "batching off" is max batch size 1. The frames are
real frames of the bundle (seeded random inputs through the head) at its best operating
point, so the work per request is what a device would cause. The goal (issue 16): the stream
at least 2x LitServe's answers/s at an equal or better p99, in every cell.

Run (Debian: `apt-get install nghttp2-client`; needs two cores):
    python benchmarks/server_throughput.py                       # bundles built on the fly
    python benchmarks/server_throughput.py --bundle path/to/bundle --duration 5
Writes benchmarks/results/server_throughput.{md,json}. LitServe is optional
(`pip install litserve`); without it only splitexit's rows are measured.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import Load, h2load_load, stream_load

from splitexit.demo import free_port
from splitexit.processes import exit_on_sigterm, server_process, wait_ready

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
LOOPBACK = "127.0.0.1"
CONCURRENCY = (1, 4, 16, 64)
BATCH_SIZES = (1, 32)  # 1: batching off
QUEUE_DELAY_MS = 2.0
NO_ADMISSION_MS = 600_000  # admission control off, as LitServe has none (benchmarks/overload.py)
FRAMES = 64
TRACKS = {
    "tiny": "built on the fly: the test suite's tiny model (small_resnet w=8, cut after layer2, "
    "C=4 x 4x4 code), random weights",
    "small": "built on the fly: the fmnist-small architecture (small_resnet w=32, cut after "
    "layer1, C=12 x 4x4 code), random weights (same compute as the trained model)",
}


# ---------------------------------------------------------------------------- bundles


def build_bundle(dest: Path, track: str) -> Path:
    """A bundle with random weights and the shape of a track's model (compute is the same),
    with its ONNX graphs when the export extra is installed."""
    import importlib.util

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
    onnx = importlib.util.find_spec("onnx") is not None
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
            onnx=onnx,
        )
    return dest


def tail_ms(bundle_path: Path, frames: list[bytes], runtime: str, threads: int) -> dict[str, float]:
    """The tail's own time (decoded codes in, answers out) for 1 and for 32 frames, in ms, on
    `runtime` in this process (pinned to the server's core): what no server can go below."""
    import time

    from splitexit.bundle import load_bundle
    from splitexit.runtime import TailRunner
    from splitexit.runtime.backends import RuntimeOptions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = TailRunner(
            load_bundle(bundle_path, parts=("tail",)),
            runtime=RuntimeOptions(runtime, ("cpu",), threads),
        )
    out = {}
    for n, repeats in ((1, 200), (32, 20)):
        codes = [runner.decode(f) for f in (frames * 32)[:n]]
        for _ in range(repeats // 4):
            runner.run_codes(codes)
        start = time.perf_counter()
        for _ in range(repeats):
            runner.run_codes(codes)
        out[str(n)] = round((time.perf_counter() - start) / repeats * 1e3, 2)
    return out


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
    bundle: Path, port: int, max_batch: int, runtime: str, args: argparse.Namespace, log: Path
) -> contextlib.AbstractContextManager[None]:
    cmd = [
        "taskset", "-c", str(args.server_cpu),
        sys.executable, "-W", "ignore", "-m", "splitexit_server.cli", "--bundle", str(bundle),
        "--host", LOOPBACK, "--port", str(port), "--max-batch-size", str(max_batch),
        "--max-queue-delay-ms", str(QUEUE_DELAY_MS), "--max-queue-size", "1024",
        "--queue-delay-target-ms", str(NO_ADMISSION_MS),
        "--threads", str(args.torch_threads), "--runtime", runtime, "--log-level", "warning",
        "--no-images",
    ]  # fmt: skip
    return running(cmd, port, "/v2/health/ready", log)


def start_litserve(
    bundle: Path, port: int, max_batch: int, runtime: str, args: argparse.Namespace, log: Path
) -> contextlib.AbstractContextManager[None]:
    """LitServe (its API server and its worker: both on the server's core), torch only."""
    assert runtime == "torch"
    cmd = [
        "taskset", "-c", str(args.server_cpu),
        sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--serve-litserve",
        "--bundle", str(bundle), "--port", str(port), "--max-batch", str(max_batch),
        "--torch-threads", str(args.torch_threads),
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


# ------------------------------------------------------------------------------ loads


def stream_spec(bundle: Path, name: str, frames: list[bytes], point: tuple[int, int]) -> tuple:
    """The stream's URL path, its handshake, and one message per frame."""
    from splitexit.bundle.manifest import read_manifest
    from splitexit.protocol.stream import message_from_frame, session_for

    m = read_manifest(bundle)
    session = session_for(name, m.fingerprint, m.bottleneck.code_shape, [point])
    messages = [message_from_frame(f, 0, session) for f in frames]
    return f"/v2/models/{name}/stream", session.encode(), messages


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
    if shutil.which("h2load") is None or shutil.which("taskset") is None:
        raise SystemExit("needs h2load and taskset: apt-get install nghttp2-client util-linux")
    have_litserve = ls is not None
    if not have_litserve:
        print("litserve not installed: measuring splitexit only", file=sys.stderr)
    bundles = list(args.bundle or [])
    with tempfile.TemporaryDirectory(prefix="splitexit-bench-") as tmp:
        return _run(args, bundles, Path(tmp), have_litserve)


def _run(
    args: argparse.Namespace, bundles: list[Path], tmp: Path, have_lit: bool
) -> dict[str, Any]:
    args.tmp = tmp
    described = {str(b): str(b) for b in bundles}
    if not bundles:
        bundles = [build_bundle(tmp / t, t) for t in args.tracks]
        described = {str(b): TRACKS[t] for b, t in zip(bundles, args.tracks, strict=True)}
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": list(args.concurrency),
            "max_batch_sizes": list(BATCH_SIZES),
            "max_queue_delay_ms": QUEUE_DELAY_MS,
            "torch_threads": args.torch_threads,
            "server_cpu": args.server_cpu,
            "load_cpu": args.load_cpu,
        },
        "bundles": [],
    }
    for bundle in bundles:
        results["bundles"].append(measure_bundle(bundle, described[str(bundle)], args, have_lit))
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def measure_bundle(
    bundle: Path, described: str, args: argparse.Namespace, have_litserve: bool
) -> dict[str, Any]:
    """Every row of one bundle: each server started on its core, measured, stopped."""
    from splitexit.bundle.manifest import read_manifest
    from splitexit.protocol.kserve import encode_request

    name, frames, point = make_frames(bundle)
    runtimes = [r for r in args.runtimes if r == "torch" or read_manifest(bundle).has_onnx]
    binary, header_length = encode_request(frames[0], None, None)
    binary_headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }
    lit = json.dumps({"frame": base64.b64encode(frames[0]).decode()}).encode()
    lit_headers = {"Content-Type": "application/json"}
    stream_path, session, messages = stream_spec(bundle, name, frames, point)
    entry: dict[str, Any] = {
        "bundle": described,
        "model": name,
        "operating_point": list(point),
        "frame_bytes": round(statistics.mean(len(f) for f in frames), 1),
        "tail_ms": _pinned_tail_ms(bundle, frames, runtimes, args),
        "rows": [],
    }
    load: dict[str, Any] = {"seconds": args.duration, "warmup_s": args.warmup, "cpu": args.load_cpu}

    def stream(port: int, c: int) -> Load:
        url = f"ws://{LOOPBACK}:{port}{stream_path}"
        return stream_load(url, session, messages, c, **load)

    def kserve(port: int, c: int) -> Load:
        url = f"http://{LOOPBACK}:{port}/v2/models/{name}/infer"
        return h2load_load(url, binary, binary_headers, c, **load)

    def litserve(port: int, c: int) -> Load:
        return h2load_load(f"http://{LOOPBACK}:{port}/predict", lit, lit_headers, c, **load)

    splitexit_rows = [("splitexit (stream)", stream), ("splitexit (binary)", kserve)]
    for max_batch in BATCH_SIZES:
        # (the server, its runtime, the rows it serves): each stopped before the next starts
        plans: list[tuple[Any, str, list[tuple[str, Any]]]] = [
            (start_splitexit, rt, splitexit_rows) for rt in runtimes
        ]
        if have_litserve:
            plans.append((start_litserve, "torch", [("LitServe (JSON)", litserve)]))
        for starter, runtime, rows in plans:
            port = free_port()
            log = args.tmp / f"{starter.__name__}-{port}.log"
            with starter(bundle, port, max_batch, runtime, args, log):
                for label, measure in rows:
                    for c in args.concurrency:
                        row = {
                            "server": label,
                            "runtime": runtime,
                            "max_batch": max_batch,
                            "concurrency": c,
                            **measure(port, c),
                        }
                        print(json.dumps(row), flush=True)
                        entry["rows"].append(row)
    entry["goal"] = goal_cells(entry["rows"])
    return entry


def _pinned_tail_ms(
    bundle: Path, frames: list[bytes], runtimes: list[str], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """`tail_ms` per runtime, measured on the server's core (no server runs meanwhile)."""
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {args.server_cpu})
        return {rt: tail_ms(bundle, frames, rt, args.torch_threads) for rt in runtimes}
    finally:
        os.sched_setaffinity(0, mask)


def goal_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (runtime, batching, concurrency): the stream against LitServe in the same run, and
    whether it has >= 2x the answers/s at an equal or better p99 (issue 16's goal)."""
    lit = {(r["max_batch"], r["concurrency"]): r for r in rows if r["server"].startswith("Lit")}
    cells = []
    for r in rows:
        other = lit.get((r["max_batch"], r["concurrency"]))
        if r["server"] != "splitexit (stream)" or other is None or not other["rps"]:
            continue
        ratio = r["rps"] / other["rps"]
        p99_ok = r["p99_ms"] is not None and r["p99_ms"] <= (other["p99_ms"] or 0.0)
        cells.append(
            {
                "runtime": r["runtime"],
                "max_batch": r["max_batch"],
                "concurrency": r["concurrency"],
                "throughput_x": round(ratio, 2),
                "p99_ms": r["p99_ms"],
                "litserve_p99_ms": other["p99_ms"],
                "met": ratio >= 2.0 and p99_ok and r["errors"] == 0,
            }
        )
    return cells


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
        f"installed, for both servers); load average {m['load_average_at_start']} at the start, "
        f"{m.get('load_average_at_end')} at the end (its own two busy processes included; the "
        "machine is shared, so other jobs may have run too; the servers were measured in the "
        "same run, one after the other).",
        "",
        f"Each cell: {s['duration_s']} s of closed-loop load after {s['warmup_s']} s of the same "
        f"load, one request in flight per client, from core {s['load_cpu']} (`h2load --h1` for "
        "HTTP; `benchmarks/loadgen.py` for the stream: one WebSocket per client, the "
        "`websockets` client on uvloop, pre-encoded messages) to the server on core "
        f"{s['server_cpu']} over loopback; {s['torch_threads']} runtime thread(s); max queue "
        f"delay {s['max_queue_delay_ms']} ms; splitexit's admission control off (LitServe has "
        "none; `benchmarks/overload.py` measures it). Batching off = max batch size 1, on = 32. "
        "Every request carries a real frame of the bundle at its best operating point: "
        "`splitexit (stream)` as a stream message, `splitexit (binary)` with the Open Inference "
        "Protocol binary-data extension, LitServe as base64 in JSON. The runtime column says "
        "what ran the tail (the same model in each): LitServe runs it on torch (TorchScript); "
        "splitexit on torch and on onnxruntime (the bundle's ONNX graphs).",
        "",
    ]
    mark = {True: "met", False: "**not met**"}
    for b in results["bundles"]:
        lines += [
            f"## {b['model']} ({b['bundle']})",
            "",
            f"Operating point (k, bits) = {tuple(b['operating_point'])}, mean frame "
            f"{b['frame_bytes']} B. The tail alone (decoded codes in, answers out, on the "
            f"server's core) takes {_tail_text(b.get('tail_ms', {}))}: no server answers faster "
            "than that.",
            "",
            "| server | runtime | batching | concurrency | answers/s | p50 ms | p99 ms | errors |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in b["rows"]:
            lines.append(
                f"| {r['server']} | {r['runtime']} | {_batching(r)} | {r['concurrency']} | "
                f"{r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |"
            )
        lines += [
            "",
            "Goal (issue 16): the stream at least 2x LitServe's answers/s at an equal or better "
            "p99, no errors.",
            "",
            "| stream runtime | batching | concurrency | answers/s vs LitServe | p99 ms "
            "(LitServe) | 2x goal |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for g in b.get("goal", []):
            lines.append(
                f"| {g['runtime']} | {_batching(g)} | {g['concurrency']} | "
                f"{g['throughput_x']}x | {g['p99_ms']} ({g['litserve_p99_ms']}) | "
                f"{mark[g['met']]} |"
            )
        lines.append("")
    unmet = [
        f"{b['model']} on {g['runtime']}, batching {_batching(g)}, {g['concurrency']} "
        + ("client" if g["concurrency"] == 1 else "clients")
        for b in results["bundles"]
        for g in b.get("goal", [])
        if not g["met"]
    ]
    lines += [
        "## The cells not met, and what bounds them",
        "",
        *(f"- {u}" for u in unmet or ["none: every cell met the goal"]),
        "",
        "- Batching on, few clients: a wait that no other request joins only delays its answer. "
        "LitServe waits its batch timeout for every such request; splitexit's batcher stops "
        "waiting once its waits keep gathering nobody (`splitexit_server.batcher`), and a "
        "periodic probe wait notices company coming back.",
        "- Batching off on torch: the tail's own time (above) against LitServe's time per "
        "answer (1 / its answers/s): twice LitServe's rate leaves less than the tail takes "
        "where the tail is the larger part of LitServe's time; onnxruntime runs the same model "
        "faster.",
        "",
    ]
    path.write_text("\n".join(lines))


def _tail_text(tail: dict[str, dict[str, float]]) -> str:
    parts = [f"{t['1']} ms for 1 frame, {t['32']} ms for 32 on {rt}" for rt, t in tail.items()]
    return "; ".join(parts) or "(not measured)"


def _batching(row: dict[str, Any]) -> str:
    return "off" if row["max_batch"] == 1 else f"on (max {row['max_batch']})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", type=Path, action="append", help="bundle(s) to serve")
    p.add_argument("--tracks", nargs="+", default=["tiny", "small"], help="built when no --bundle")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each cell")
    p.add_argument(
        "--runtimes",
        nargs="+",
        default=["torch", "onnxruntime"],
        help="splitexit's runtimes (onnxruntime: when the bundle has ONNX graphs)",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="threads of every server's runtime")
    p.add_argument("--server-cpu", type=int, default=1, help="the core the servers run on")
    p.add_argument("--load-cpu", type=int, default=0, help="the core the load runs on")
    p.add_argument("--out", type=Path, default=RESULTS / "server_throughput")
    p.add_argument("--serve-litserve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_litserve:
        serve_litserve(args.bundle[0], args.port, args.max_batch, args.torch_threads)
        return 0
    exit_on_sigterm()  # the servers are stopped on the way out
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
