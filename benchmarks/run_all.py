"""The benchmark suite in one command (`make bench`): every strategy, every link rate, one run.

    python benchmarks/run_all.py [--bundle PATH] [--large-bundle PATH] [--inputs N]
        [--point K,BITS] [--large-point K,BITS]
        [--rates 1,5,20,100] [--rtt-ms 20] [--device-speed F] [--transport http,stream]
        [--quick]

Per track (small: `--bundle`, default the shipped `splitexit/zoo/fmnist-small`; large:
`--large-bundle`, skipped with a note when not given), on the same Fashion-MNIST test
images: local-only, full offload (JPEG q95, PNG), split-only, split + exit and split + exit
+ adaptive policy, at each link rate with `--rtt-ms` of RTT through the loopback link
emulator, each split strategy once per `--transport` (KServe v2 over HTTP, the stream; both
by default, side by side in one report); where the cost model says splitting is meant to
pay; the analytic floor of each split run, the wire size of every format, the
device-side cost, and where split + exit wins. Writes `suite_<track>.md`, `.json` and two
PNG plots to benchmarks/results/ (`--quick`: a temporary folder, unless `--out`).

`--device-speed F` (>= 1) models a device F times slower at compute by sleeping (F - 1) x
each device-side piece's time; section 5 of the report also projects other speeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import torch

# benchmarks/ is on sys.path when this runs as a script: `suite` and `track_report` import
from suite import analysis, plots, report, split_pays
from suite.inputs import Inputs, load_inputs
from suite.link_check import LinkCost, link_cost
from suite.services import link_process, parse_cpus, pin_device, tail_server
from suite.split_runs import (
    AdaptiveSettings,
    BareRequests,
    default_floor,
    run_bare_requests,
    run_split,
    widest_point,
)
from suite.strategies import (
    BY_KEY,
    GAP_S,
    STRATEGIES,
    TRANSPORTS,
    cell_name,
    run_full_offload,
    run_local,
)
from suite.wire import measure_wire

from splitexit.bundle import Bundle, load_bundle
from splitexit.calibrate import measure_compute
from splitexit.commands.calibrate import parse_point
from splitexit.errors import SplitexitError
from splitexit.processes import exit_on_sigterm
from splitexit.runtime import HeadRunner
from splitexit_device.config import exit_rates, operating_points

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_OUT = Path(tempfile.gettempdir()) / "splitexit-bench-quick"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/run_all.py",
        description="splitexit's benchmark suite: split + exit against local-only and full "
        "offload, over an emulated link, in one run.",
    )
    p.add_argument("--bundle", type=Path, help="small-track bundle (default: the shipped one)")
    p.add_argument("--large-bundle", type=Path, help="large-track bundle (default: skip it)")
    for flag, track in (("--point", "small"), ("--large-point", "large")):
        p.add_argument(
            flag,
            metavar="K,BITS",
            help=f"operating point split-only and split + exit send at, {track} track (default: "
            "all channels, most bits; calibrate the bundle at it: `splitexit calibrate --point`)",
        )
    p.add_argument("--inputs", type=int, help="test images per cell, each track (300; quick 30)")
    p.add_argument(
        "--large-inputs", type=int, help="test images per cell, large track (default: --inputs)"
    )
    p.add_argument(
        "--tracks",
        default="small,large",
        help="which tracks to run, comma-separated (small,large; large needs --large-bundle)",
    )
    p.add_argument("--rates", default="0.1,1,5,20,100", help="link rates, Mbit/s (0.1,1,5,20,100)")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time (20)")
    p.add_argument(
        "--device-speed",
        type=float,
        default=1.0,
        help="device F times slower than this CPU: sleeps (F-1) x device compute (1.0)",
    )
    p.add_argument("--deadline-ms", type=float, help="adaptive policy's per-input deadline (none)")
    p.add_argument(
        "--accuracy-floor",
        type=float,
        help="adaptive policy's accuracy floor (default: the bundle's most accurate point, "
        "less 1 point: calibration's default)",
    )
    p.add_argument(
        "--reference-rate",
        type=float,
        default=5.0,
        help="rate for the device-cost table and plot (nearest measured; 5)",
    )
    p.add_argument(
        "--strategies",
        default=",".join(s.key for s in STRATEGIES),
        help="comma-separated subset (default: all)",
    )
    p.add_argument(
        "--cell-timeout-s", type=float, help="longest one cell's round may run (180; quick 30)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="run every rate's cells in this many rounds, each on a part of the inputs, the "
        "cells' order rotated each round, so that cells compared share the machine's pace (5)",
    )
    p.add_argument("--out", type=Path, help=f"results folder ({RESULTS}; --quick: {QUICK_OUT})")
    p.add_argument("--quick", action="store_true", help="30 inputs per cell: about a minute")
    p.add_argument(
        "--transport",
        default=",".join(TRANSPORTS),
        help="how the split strategies offload, comma-separated: KServe v2 over HTTP (http), "
        "the stream (stream); each split strategy runs once per transport (http,stream)",
    )
    p.add_argument(
        "--cpus",
        default="auto",
        metavar="DEVICE,SERVER",
        help="pin the device (this process: agent, local-only, encodes) to core DEVICE and the "
        "server and link emulator to core SERVER, as on two machines (auto: the first two "
        "usable cores when there are two or more; none: no pinning)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        keys = [k.strip() for k in args.strategies.split(",") if k.strip()]
        unknown = [k for k in keys if k not in BY_KEY]
        transports = list(dict.fromkeys(t.strip() for t in args.transport.split(",") if t.strip()))
        if not transports or any(t not in TRANSPORTS for t in transports):
            raise ValueError(f"bad --transport {args.transport!r}")
        if unknown or not rates or min(rates) <= 0 or args.device_speed < 1:
            raise ValueError(f"unknown strategies {unknown}" if unknown else "bad rates or speed")
    except ValueError as e:
        print(
            f"run_all: {e}; strategies: {list(BY_KEY)}, transports: {list(TRANSPORTS)}, "
            "device speed >= 1",
            file=sys.stderr,
        )
        return 2
    args.rates, args.keys, args.transports = rates, keys, transports
    try:
        args.points = {"small": parse_point(args.point), "large": parse_point(args.large_point)}
        cpus = parse_cpus(args.cpus)
    except ValueError as e:
        print(f"run_all: {e}", file=sys.stderr)
        return 2
    args.inputs = args.inputs or (30 if args.quick else 300)
    args.track_inputs = {"small": args.inputs, "large": args.large_inputs or args.inputs}
    wanted = [t.strip() for t in args.tracks.split(",") if t.strip()]
    if not wanted or any(t not in ("small", "large") for t in wanted):
        print(f"run_all: --tracks takes small and/or large, got {args.tracks!r}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print(f"run_all: --rounds must be 1 or more, got {args.rounds}", file=sys.stderr)
        return 2
    args.cell_timeout_s = args.cell_timeout_s or (30.0 if args.quick else 180.0)
    out = args.out or (QUICK_OUT if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the device side: one core; the server gets the other
    args.cpus = None if cpus is None else list(cpus)
    args.usable_cores = len(os.sched_getaffinity(0)) if cpus is not None else None
    args.server_cpus = pin_device(cpus)
    exit_on_sigterm()  # servers and link emulators are stopped on the way out
    warnings.filterwarnings("ignore", category=FutureWarning)

    tracks: list[tuple[str, Path | None]] = [("small", args.bundle), ("large", args.large_bundle)]
    written = []
    for track, path in tracks:
        if track not in wanted:
            continue
        if track == "small" and path is None:
            from splitexit.zoo import default_bundle_path

            try:
                path = default_bundle_path()
            except SplitexitError as e:
                print(f"run_all: {e}; or pass --bundle PATH", file=sys.stderr)
                return 1
        if path is None:
            print(f"[{track}] skipped: no --large-bundle given", flush=True)
            continue
        written += run_track(track, path, args, out)
    print("\nwrote:\n" + "\n".join(f"  {p}" for p in written))
    return 0


def run_track(track: str, path: Path, args: argparse.Namespace, out: Path) -> list[Path]:
    """Every measurement of one track; returns the files written."""
    began = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = report.machine()
    if args.usable_cores is not None:  # this process is pinned to one of them
        machine["usable_cores"] = args.usable_cores
    bundle = load_bundle(path)
    point = args.points[track] or widest_point(bundle)
    grid = {(p.channels, p.bits) for p in operating_points(bundle)}
    if point not in grid:
        raise SystemExit(
            f"run_all: ({point[0]}, {point[1]}) is not an operating point of {path}; "
            f"its points: {sorted(grid)}"
        )
    inputs = load_inputs(bundle, args.track_inputs[track])
    say = _sayer(track)
    say(f"bundle {bundle.manifest.name} ({path}), {len(inputs)} inputs, sends at {point}")
    warm_up(bundle, inputs)
    tail_ms = analysis.tail_compute_ms(bundle, inputs)
    deadline_ms = args.deadline_ms
    adaptive = AdaptiveSettings(
        None if deadline_ms is None else deadline_ms / 1e3,
        args.accuracy_floor if args.accuracy_floor is not None else default_floor(bundle),
    )
    notes: list[str] = []
    if all(t > 1 for t in bundle.manifest.thresholds.values()):
        notes.append(
            "every exit threshold is above 1: the bundle is not calibrated, so no input exits "
            "and split + exit is split-only (run `splitexit calibrate` on it first)"
        )
        say(notes[-1])
    cells, bare, emulator = measure(track, path, bundle, inputs, point, args, adaptive, notes)
    say("wire sizes and accuracy per format (offline)")
    wire = measure_wire(bundle, inputs, tail_ms=tail_ms, frame_http=_frame_overhead(cells))
    meant = _meant_to_pay(bundle, cells, bare, point, tail_ms, args)

    m = bundle.manifest
    ref = min(args.rates, key=lambda r: abs(r - args.reference_rate))
    speed = args.device_speed
    doc: dict[str, Any] = {
        "track": track,
        "bundle": {
            "name": m.name,
            "path": str(path),
            "fingerprint": m.fingerprint,
            "thresholds": m.thresholds,
            "teacher_accuracy": m.teacher_accuracy,
            "split_point": list(point),
        },
        "command": "python benchmarks/run_all.py " + shlex.join(sys.argv[1:]),
        "started": started,
        "config": {
            "inputs": len(inputs),
            "rates_mbit": args.rates,
            "rtt_ms": args.rtt_ms,
            "device_speed": speed,
            "quick": args.quick,
            "transports": args.transports,
            "reference_rate_mbit": ref,
            "gap_ms": GAP_S * 1e3,
            "cell_timeout_s": args.cell_timeout_s,
            "rounds": len(inputs.parts(args.rounds)),
            "cpus": args.cpus,
        },
        "adaptive": {"deadline_ms": deadline_ms, "accuracy_floor": adaptive.accuracy_floor},
        "machine": machine,
        "link": report.LINK_NOTE,
        "cells": [
            {
                "strategy": c.strategy,
                "transport": c.transport,
                "rate_mbit": c.rate_mbit,
                "stats": c.stats,
                "extra": c.extra,
            }
            for c in cells
        ],
        "tail_compute_ms": round(tail_ms, 4),
        "ideal_vs_achieved": analysis.ideal_vs_achieved(
            cells, args.rtt_ms, tail_ms, speed, emulator
        ),
        "bare_requests": analysis.bare_floors(bare, args.rtt_ms, tail_ms, emulator),
        "wire": wire,
        "offload_bytes": analysis.offload_bytes(cells),
        "device_cost": analysis.device_cost(cells, ref, speed),
        "projections": analysis.projections(cells, args.rates, speed),
        "split_pays": meant,
        "goals": analysis.goals(cells, args.rates, meant["cells"] if meant else ()),
        "notes": sorted(set(notes)),
    }
    doc["seconds"] = round(time.perf_counter() - began, 1)
    doc["machine"]["load_average_end"] = report.machine()["load_average"]
    pngs = [
        plots.latency_plot(doc, out / f"suite_{track}_latency.png"),
        plots.accuracy_plot(doc, out / f"suite_{track}_accuracy_bytes.png"),
    ]
    md, js = report.write_report(doc, out, pngs)
    say(f"done in {doc['seconds']:.0f} s")
    return [md, js, *pngs]


def measure(
    track: str,
    path: Path,
    bundle: Bundle,
    inputs: Inputs,
    point: tuple[int, int],
    args: argparse.Namespace,
    adaptive: AdaptiveSettings,
    notes: list[str],
) -> tuple[
    list[analysis.Cell],
    dict[tuple[str, float | None], BareRequests],
    dict[tuple[str, float], LinkCost],
]:
    """Per rate: bare requests and the link emulator's own cost per transport, then every
    cell (local-only, full offload once, each split strategy once per transport) in
    `args.rounds` rounds, each round a part of the inputs for every cell, the cells' order
    rotated by one each round: this machine's pace drifts over seconds, and cells compared
    with each other should share it. Bare requests and emulator costs are keyed by
    (transport, rate); rate None: straight to the server."""
    say = _sayer(track)
    cells: list[analysis.Cell] = []
    bare: dict[tuple[str, float | None], BareRequests] = {}
    emulator: dict[tuple[str, float], LinkCost] = {}
    # local-only runs at every rate, in its rounds (the goals compare each rate's cells with
    # it); the rate-less cell pools every run
    local = analysis.Cell("local", None, []) if "local" in args.keys else None
    if local is not None:
        cells.append(local)
    order = [
        (key, t)
        for key in args.keys
        for t in (args.transports if BY_KEY[key].kind == "split" else [None])
    ]
    parts = inputs.parts(args.rounds)
    logs = Path(tempfile.mkdtemp(prefix=f"splitexit-bench-{track}-"))

    def bare_run(url: str, transport: str) -> BareRequests:
        run = run_bare_requests(bundle, inputs, url, point, transport=transport)
        return asyncio.run(asyncio.wait_for(run, 60))

    with tail_server(path, logs / "server.log", cpus=args.server_cpus) as url:
        say(f"tail server at {url} (server log {logs})")
        for t in args.transports:
            bare[(t, None)] = bare_run(url, t)
            say(f"bare requests  {t:<6} direct (no link)  mean {bare[(t, None)].mean_ms:7.2f} ms")
        for rate in args.rates:
            spec = f"{rate:g}mbit:{args.rtt_ms:g}ms"
            link = link_process(
                url.split("//", 1)[1], spec, logs / "link.log", cpus=args.server_cpus
            )
            with link as link_url:
                for t in args.transports:
                    b = bare[(t, rate)] = bare_run(link_url, t)
                    say(f"bare requests  {t:<6} {rate:>5g} Mbit/s  mean {b.mean_ms:7.2f} ms")
                    own = emulator[(t, rate)] = link_cost(
                        spec, b.request_bytes, b.response_bytes, cpus=args.server_cpus
                    )
                    say(f"link emulator  {t:<6} {rate:>5g} Mbit/s  own {own.excess_ms:7.2f} ms")
                here = {(k, t): analysis.Cell(k, rate, [], transport=t) for k, t in order}
                for r, part in enumerate(parts):
                    for key, t in rotated(order, r):
                        cell = here[(key, t)]
                        if key == "local":
                            cell.samples.extend(run_local(bundle, part, args.device_speed))
                            continue
                        ran = _run_cell(
                            bundle, part, link_url, key, t, rate, point, args, adaptive, notes
                        )
                        cell.add(asyncio.run(ran))
                    if len(parts) > 1:
                        say(f"{rate:g} Mbit/s: round {r + 1} of {len(parts)} done")
                for cell in here.values():
                    cells.append(cell)
                    if local is not None and cell.strategy == "local":
                        local.samples.extend(cell.samples)
                    say(_line(cell))
    return cells, bare, emulator


def rotated(order: list[Any], r: int) -> list[Any]:
    """`order` rotated left by `r`: round r's order of the cells."""
    k = r % len(order) if order else 0
    return order[k:] + order[:k]


async def _run_cell(
    bundle: Bundle,
    inputs: Inputs,
    url: str,
    key: str,
    transport: str | None,
    rate: float,
    point: tuple[int, int],
    args: argparse.Namespace,
    adaptive: AdaptiveSettings,
    notes: list[str],
) -> analysis.Cell:
    """One strategy at one rate (a split one over `transport`), bounded by the cell timeout;
    a failure leaves it empty with a note (the run goes on)."""
    strategy = BY_KEY[key]
    limit = args.cell_timeout_s
    where = f"{cell_name(key, transport)} at {rate:g} Mbit/s"
    try:
        if strategy.kind == "image":
            run = run_full_offload(
                bundle.manifest.name, inputs, url, strategy, speed=args.device_speed
            )
            return analysis.Cell(key, rate, await asyncio.wait_for(run, limit))
        samples, summary = await run_split(
            bundle,
            inputs,
            url,
            strategy,
            point=point,
            adaptive=adaptive,
            speed=args.device_speed,
            timeout_s=limit,
            log=lambda msg: notes.append(f"{where}: {msg}"),
            transport=transport or "http",
        )
    except (asyncio.TimeoutError, SplitexitError, httpx.HTTPError, OSError) as e:
        why = str(e) or "ran over the timeout"
        notes.append(f"{where}: no samples ({type(e).__name__}: {why})")
        print(f"  {notes[-1]}", file=sys.stderr)
        return analysis.Cell(key, rate, [], transport=transport)
    keep = ("fallback_reasons", "retries", "link", "client_sent_bytes", "client_received_bytes")
    extra = {k: summary.get(k) for k in keep}
    return analysis.Cell(key, rate, samples, extra, transport)


@torch.inference_mode()
def warm_up(bundle: Bundle, inputs: Inputs, rounds: int = 3) -> None:
    """Run every TorchScript piece a few times at batch 1 (the profiling executor optimises
    on the first calls) so no strategy pays for it in its first inputs."""
    head = HeadRunner(bundle)
    small = Inputs(inputs.pixels[:rounds], inputs.labels[:rounds], inputs.class_names)
    for _ in range(2):
        run_local(bundle, small, gap_s=0.0)
        for i in range(len(small)):
            head.run(bundle.preprocess(small.pixels[i][None]), thresholds=None)


def _frame_overhead(cells: list[analysis.Cell]) -> float | None:
    """Mean HTTP bytes around a frame in split-only's HTTP requests (None if it sent none)."""
    sent = [
        s.request_bytes - s.payload_bytes
        for c in cells
        if c.strategy == "split" and c.transport == "http"
        for s in c.samples
        if s.offloaded
    ]
    return sum(sent) / len(sent) if sent else None


def _meant_to_pay(
    bundle: Bundle,
    cells: list[analysis.Cell],
    bare: dict[tuple[str, float | None], BareRequests],
    point: tuple[int, int],
    tail_ms: float,
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """Where the cost model says splitting pays (`suite.split_pays`), its inputs and the
    line that says why; None without a local-only cell to price the device by."""
    m = bundle.manifest
    frames = {t: b.request_bytes + b.response_bytes for (t, rate), b in bare.items() if rate}
    inputs = split_pays.model_inputs(
        cells,
        measure_compute(bundle, point=point),
        exit_rates(bundle),
        tuple(e.segment for e in m.exits),
        tail_ms,
        frames,
        m.exit_names,
    )
    if inputs is None:
        return None
    rows = split_pays.where_split_pays(inputs, args.rates, args.rtt_ms, args.device_speed)
    return {
        "threshold_pct": 100 * split_pays.PAYS_BELOW,
        "inputs": inputs.to_dict(),
        "cells": rows,
        "why": split_pays.why(inputs, rows, args.device_speed),
    }


def _line(c: analysis.Cell) -> str:
    st = c.stats
    if not st.get("inputs"):
        return f"{c.name:<26} {'-' if c.rate_mbit is None else c.rate_mbit:>5}  no samples"
    lat = st["latency_ms"]
    acc = "-" if st["accuracy"] is None else f"{st['accuracy']:.3f}"
    rate = "-" if c.rate_mbit is None else f"{c.rate_mbit:g}"
    return (
        f"{c.name:<26} {rate:>5} Mbit/s  mean {lat['mean']:7.2f} ms  p95 {lat['p95']:7.2f} ms"
        f"  acc {acc}  up {st['bytes_per_input']['request']:7.0f} B/input"
        f"  offloaded {100 * st['offload_rate']:5.1f}%"
        + (f"  {st['actions']}" if st.get("actions") else "")
    )


def _sayer(track: str) -> Any:
    def say(msg: str) -> None:
        print(f"[{track}] {msg}", flush=True)

    return say


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
    raise SystemExit(130)
