"""What the device agent costs per input beyond its compute and the round trip.

    python benchmarks/agent_overhead.py [--bundle PATH] [--inputs 200] [--rounds 2]

Starts `splitexit-server` on `--bundle` (default the shipped small-track bundle; a large-track
bundle runs the large track) as the suite does (loopback, or through the suite's link
emulator with `--link`; this process and the server each on a core of their own with
`--cpus`, as in the suite) and runs the suite's split strategies
(`suite.split_runs.run_split`: the real `device.Agent`, closed loop, 10 ms between an answer
and the next input; the adaptive policy with the suite's default accuracy floor) over both
transports. For every input answered by the server it splits the latency (from the agent's
record) into device compute (the suite's `DeviceClock`), the round trip (the client's own
timing of the request: network + server) and the rest: the agent's overhead (threads, event
loop, policy, cost model, records). Inputs answered on the device (an exit, or the adaptive
policy's tail here) have no round trip: their rest is latency less compute. Bare requests
(`run_bare_requests`) give the transport's round trip without the agent. Writes
benchmarks/results/<--name>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from suite.inputs import load_inputs
from suite.report import machine, machine_line
from suite.services import link_process, parse_cpus, pin_device, tail_server
from suite.split_runs import AdaptiveSettings, default_floor, run_bare_requests, run_split
from suite.strategies import BY_KEY, TRANSPORTS

from splitexit.bundle import load_bundle
from splitexit.zoo import default_bundle_path

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("split", "split-exit", "split-exit-adaptive")


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
    }


def split_gap(samples: list[Any], speed: float) -> dict[str, Any]:
    """Per-input ms (means, medians) of latency, compute (x F), round trip and the rest."""
    off = [s for s in samples if s.answered_by == "server" and s.network_ms is not None]
    local = [s for s in samples if s.answered_by not in ("server", "fallback", "error")]
    device = [speed * sum(s.device_ms.values()) for s in off]
    trip = [s.network_ms + (s.server_ms or 0.0) for s in off]
    total = [s.total_ms for s in off]
    rest = [t - d - r for t, d, r in zip(total, device, trip, strict=True)]
    return {
        "offloaded": len(off),
        "answered_here": len(local),
        "latency": _stats(total),
        "device": _stats(device),
        "round_trip": _stats(trip),
        "agent": _stats(rest),
        "agent_here": _stats([s.total_ms - speed * sum(s.device_ms.values()) for s in local]),
    }


async def measure(path: Path, url: str, n: int, speed: float) -> dict[str, Any]:
    """One round on the bundle at `path`: bare requests and each split strategy, per
    transport."""
    bundle = load_bundle(path)
    inputs = load_inputs(bundle, n)
    out: dict[str, Any] = {}
    for transport in TRANSPORTS:
        bare = await run_bare_requests(bundle, inputs, url, n=n, transport=transport)
        out[f"bare/{transport}"] = bare.mean_ms
        for key in STRATEGIES:
            samples, _ = await run_split(
                bundle,
                inputs,
                url,
                BY_KEY[key],
                adaptive=AdaptiveSettings(None, default_floor(bundle)),
                speed=speed,
                transport=transport,
            )
            out[f"{key}/{transport}"] = split_gap(samples, speed)
    return out


def _ms(d: dict[str, float], key: str = "mean") -> str:
    return f"{d[key]:.2f}" if d else "-"


def table(rounds: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| cell | round | offloaded | latency | device | round trip | bare round trip "
        "| **agent** (mean) | agent (median) | agent p90 | answered here "
        "| answered here: latency - device |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for transport in TRANSPORTS:
        for key in STRATEGIES:
            for i, r in enumerate(rounds):
                g = r[f"{key}/{transport}"]
                lines.append(
                    f"| {key}/{transport} | {i + 1} | {g['offloaded']} | {_ms(g['latency'])} "
                    f"| {_ms(g['device'])} | {_ms(g['round_trip'])} "
                    f"| {r[f'bare/{transport}']:.2f} | **{_ms(g['agent'])}** "
                    f"| {_ms(g['agent'], 'median')} | {_ms(g['agent'], 'p90')} "
                    f"| {g['answered_here']} | {_ms(g['agent_here'])} |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, help="the bundle to run (default: the shipped small-track one)"
    )
    parser.add_argument("--inputs", type=int, default=200, help="inputs per strategy")
    parser.add_argument("--rounds", type=int, default=2, help="run every cell this often")
    parser.add_argument(
        "--device-speed", type=float, default=1.0, help="F: the device F times slower (>= 1)"
    )
    parser.add_argument("--link", help="through the suite's link emulator, e.g. 20mbit:20ms")
    parser.add_argument("--name", default="agent_overhead", help="results file stem")
    parser.add_argument(
        "--cpus",
        default="auto",
        help="DEVICE,SERVER: this process on core DEVICE, the server and link emulator on "
        "SERVER (auto: the first two usable cores when there are two or more; none: no pinning)",
    )
    args = parser.parse_args(argv)
    try:
        cpus = parse_cpus(args.cpus)
    except ValueError as e:
        print(f"agent_overhead: {e}", file=sys.stderr)
        return 2
    path = args.bundle or default_bundle_path()
    server_cpus = pin_device(cpus)
    torch.set_num_threads(1)

    rounds: list[dict[str, Any]] = []
    log = Path(tempfile.mkdtemp(prefix="splitexit-agent-")) / "server.log"
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(tail_server(path, log, cpus=server_cpus))
        if args.link is not None:
            target = url.removeprefix("http://")
            url = stack.enter_context(link_process(target, args.link, log, cpus=server_cpus))
        for r in range(args.rounds):
            rounds.append(asyncio.run(measure(path, url, args.inputs, args.device_speed)))
            print(f"round {r + 1}:")
            for line in table(rounds[-1:])[2:]:
                print("  " + line)

    command = " ".join(["python benchmarks/agent_overhead.py", *sys.argv[1:]])
    where = "loopback, no link emulator" if args.link is None else f"the emulated {args.link}"
    if cpus is not None:
        where += f" (this process on core {cpus[0]}, the server on {cpus[1]})"
    lines = [
        "# Device agent overhead",
        "",
        f"`{command}`",
        "",
        f"The device agent (`suite.split_runs.run_split`) on {args.inputs} Fashion-MNIST "
        "inputs, closed loop (10 ms idle before each input), to `splitexit-server` on "
        f"bundle {load_bundle(path).manifest.name} (`{path}`) over {where}. Per input "
        "answered by the server, ms: *latency* from the agent's record, *device* the "
        "compute the suite's `DeviceClock` counted, *round trip* the client's timing of the "
        "request (network + server), *agent* = latency - device - round trip: what the "
        "agent adds (threads, event loop, policy, cost model, records). *Bare round trip*: "
        "the client's `infer` of one frame alone, no agent (`run_bare_requests`). *Answered "
        "here*: inputs answered on the device (an exit, the tail here) and what they took "
        "beyond their compute. One row per round.",
        "",
        f"Machine: {machine_line(machine())}; Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}.",
        "",
        *table(rounds),
    ]
    RESULTS.mkdir(exist_ok=True)
    md = RESULTS / f"{args.name}.md"
    md.write_text("\n".join(lines) + "\n")
    doc = {"command": command, "machine": machine(), "inputs": args.inputs, "rounds": rounds}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
