"""What the measurements say: analytic floors, device-side cost, and where each strategy wins.

Analytic floor of one input (split strategies), with its own measured compute and bytes,
priced by the one cost model (`splitexit.cost`: the link term is `Link.transfer_s`):

    answered here:  F x (its device compute: preprocess, head, exits, tail here)
    offloaded:      F x (its device compute: ... quantize + frame, or the image encode)
                    + (request + response bytes) x 8 / rate + RTT + tail compute

Tail compute is what the server reports computing for that very request (its Server-Timing
`compute`: the tail model on the request's batch, as it ran there), so the floor holds both
halves' compute as measured, cold or warm; the in-process median stands in for a record
without it.

F is `--device-speed`. The gap between the measured latency and the floor is what the
framework adds. For each offloaded input it splits, from the agent's own record, into

    server     its Server-Timing total - its compute   (parsing, batcher, decode, answer)
    network    round trip - server - bytes x 8 / rate - RTT   (the HTTP client, the link
               emulator, the OS; uvicorn before and after the server's own timing)
    agent      latency - device compute - round trip   (threads, event loop, policy, records)

Bare requests (`OffloadClient.infer` of one frame alone) time the transport without the
agent, straight to the server and through the link. The link emulator's own cost (a raw TCP
exchange of the same bytes through it, less the same exchange straight; `link_check`) is
the measurement's share of "network": a real link has no proxy in the middle.

Projection to another device speed F' scales the measured device compute only:

    latency(F') = measured latency + (F' - F) x device compute (unslowed)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from splitexit.bundle import Bundle
from splitexit.cost import Link
from splitexit.runtime import HeadRunner, TailRunner

from .inputs import Inputs
from .link_check import LinkCost
from .samples import Sample, summarize
from .split_runs import BareRequests
from .strategies import BY_KEY, cell_name

PROJECTED_SPEEDS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Cell:
    """The samples of one strategy at one link rate (None: no link, local-only) over one
    transport (split strategies: "http" or "stream"; None for the others)."""

    strategy: str
    rate_mbit: float | None
    samples: list[Sample]
    extra: dict[str, Any] = field(default_factory=dict)
    transport: str | None = None

    @property
    def name(self) -> str:
        """The strategy and transport, e.g. "split-exit/stream" (`strategies.cell_name`)."""
        return cell_name(self.strategy, self.transport)

    @property
    def stats(self) -> dict[str, Any]:
        return summarize(self.samples)

    def mean_ms(self) -> float:
        return float(np.mean([s.total_ms for s in self.samples]))

    def device_ms(self) -> float:
        """Mean device compute per input, unslowed."""
        return float(np.mean([sum(s.device_ms.values()) for s in self.samples]))

    def add(self, part: Cell) -> None:
        """Add one round's run of this cell: its samples, its counts summed (dicts of
        counts per key), the agent's link estimate the latest round's."""
        self.samples.extend(part.samples)
        for key, value in part.extra.items():
            held = self.extra.get(key)
            if isinstance(value, dict) and isinstance(held, dict) and key != "link":
                self.extra[key] = {k: held.get(k, 0) + value.get(k, 0) for k in held | value}
            elif isinstance(value, int | float) and isinstance(held, int | float):
                self.extra[key] = held + value
            elif value is not None:
                self.extra[key] = value


@torch.inference_mode()
def tail_compute_ms(bundle: Bundle, inputs: Inputs, repeats: int = 30) -> float:
    """Median time the server computes one frame: decode, dequantize, tail (batch of one)."""
    head, tail = HeadRunner(bundle), TailRunner(bundle)
    x = bundle.preprocess(inputs.pixels[:1])
    z = head.run(x, exits=False).z
    assert z is not None
    b = bundle.manifest.bottleneck
    frame = head.frame(z, max(b.bits), b.channels)
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        tail.run_frames([frame])
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def floor_ms(s: Sample, rate_mbit: float, rtt_ms: float, tail_ms: float, speed: float) -> float:
    """The analytic floor of one input; `tail_ms` stands in for a sample without its own."""
    device = speed * sum(s.device_ms.values())
    if not s.offloaded:
        return device
    link = Link.mbit(rate_mbit, rtt_ms)
    return device + 1e3 * link.transfer_s(s.request_bytes + s.response_bytes) + _tail(s, tail_ms)


def _tail(s: Sample, fallback_ms: float) -> float:
    return s.tail_ms if s.tail_ms is not None else fallback_ms


def ideal_vs_achieved(
    cells: Sequence[Cell],
    rtt_ms: float,
    tail_ms: float,
    speed: float,
    emulator: Mapping[tuple[str, float], LinkCost] | None = None,
) -> list[dict[str, Any]]:
    """Per split cell: mean floor and mean measured latency, over all inputs and offloaded;
    for offloaded inputs, the gap split into server, network and agent, and (given the
    link emulator's own cost per (transport, rate)) the gap without the emulator's share."""
    rows = []
    for c in cells:
        if BY_KEY[c.strategy].kind != "split" or c.rate_mbit is None or not c.samples:
            continue
        floors = np.array([floor_ms(s, c.rate_mbit, rtt_ms, tail_ms, speed) for s in c.samples])
        measured = np.array([s.total_ms for s in c.samples])
        off = np.array([s.offloaded for s in c.samples])
        row: dict[str, Any] = {
            "strategy": c.strategy,
            "transport": c.transport,
            "rate_mbit": c.rate_mbit,
            "offload_rate": round(float(off.mean()), 4),
            "floor_ms": round(float(floors.mean()), 3),
            "measured_ms": round(float(measured.mean()), 3),
            "gap_ms": round(float(measured.mean() - floors.mean()), 3),
            "gap_pct": round(100 * float(measured.mean() / floors.mean() - 1), 1),
        }
        if off.any():
            f, m = float(floors[off].mean()), float(measured[off].mean())
            row["offloaded"] = {
                "floor_ms": round(f, 3),
                "measured_ms": round(m, 3),
                "gap_pct": round(100 * (m / f - 1), 1),
                **_gap_parts(
                    [s for s in c.samples if s.offloaded], c.rate_mbit, rtt_ms, tail_ms, speed
                ),
            }
            own = (emulator or {}).get((c.transport, c.rate_mbit))
            if own is not None:
                row["offloaded"]["link_emulator_ms"] = round(own.excess_ms, 3)
                row["offloaded"]["gap_pct_without_emulator"] = round(
                    100 * ((m - own.excess_ms) / f - 1), 1
                )
        rows.append(row)
    return rows


def _gap_parts(
    offloaded: Sequence[Sample], rate_mbit: float, rtt_ms: float, tail_ms: float, speed: float
) -> dict[str, float]:
    """Mean ms of the gap spent in the server, the network path and the agent (see the
    module docstring); {} when the records lack the round trip."""
    server, network, agent = [], [], []
    for s in offloaded:
        if s.network_ms is None:
            continue
        tail = _tail(s, tail_ms)
        srv = s.server_ms if s.server_ms is not None else tail  # unknown: all in network
        link = 1e3 * Link.mbit(rate_mbit, rtt_ms).transfer_s(s.request_bytes + s.response_bytes)
        device = speed * sum(s.device_ms.values())
        server.append(srv - tail)
        network.append(s.network_ms - link)
        agent.append(s.total_ms - device - s.network_ms - srv)
    if not server:
        return {}
    return {
        "server_ms": round(float(np.mean(server)), 3),
        "network_ms": round(float(np.mean(network)), 3),
        "agent_ms": round(float(np.mean(agent)), 3),
    }


def bare_floors(
    bare: Mapping[tuple[str, float | None], BareRequests],
    rtt_ms: float,
    tail_ms: float,
    emulator: Mapping[tuple[str, float], LinkCost] | None = None,
) -> list[dict[str, Any]]:
    """Bare requests per (transport, rate) (rate None: straight to the server, no emulator)
    against their floor, bytes x 8 / rate + RTT + tail compute as the server reported it
    (direct: the tail alone; `tail_ms` where not reported), with the link emulator's own
    cost where known."""
    rows = []
    for (transport, rate), b in sorted(bare.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        nbytes = b.request_bytes + b.response_bytes
        link = 0.0 if rate is None else 1e3 * Link.mbit(rate, rtt_ms).transfer_s(nbytes)
        tail = b.tail_ms if b.tail_ms is not None else tail_ms
        floor = link + tail
        own = None if rate is None else (emulator or {}).get((transport, rate))
        rows.append(
            {
                "transport": transport,
                "rate_mbit": rate,
                "requests": b.count,
                "request_bytes": round(b.request_bytes, 1),
                "response_bytes": round(b.response_bytes, 1),
                "floor_ms": round(floor, 3),
                "measured_ms": round(b.mean_ms, 3),
                "gap_ms": round(b.mean_ms - floor, 3),
                "gap_pct": round(100 * (b.mean_ms / floor - 1), 1),
                "link_emulator_ms": None if own is None else round(own.excess_ms, 3),
            }
        )
    return rows


def offload_bytes(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Per transport, mean bytes per offloaded input over split-only's cells (all rates;
    where split-only offloaded nothing, any split strategy's): payload (the frame), request
    and response as they crossed the link, and the protocol's share of both."""
    rows = []
    split = [c for c in cells if c.transport is not None]
    for transport in sorted({c.transport for c in split if c.transport is not None}):
        mine = [c for c in split if c.transport == transport]
        off = [s for c in mine if c.strategy == "split" for s in c.samples if s.offloaded]
        off = off or [s for c in mine for s in c.samples if s.offloaded]
        if not off:
            continue
        payload = float(np.mean([s.payload_bytes for s in off]))
        up = float(np.mean([s.request_bytes for s in off]))
        down = float(np.mean([s.response_bytes for s in off]))
        rows.append(
            {
                "transport": transport,
                "offloads": len(off),
                "payload_bytes": round(payload, 1),
                "request_bytes": round(up, 1),
                "response_bytes": round(down, 1),
                "protocol_bytes": round(up + down - payload, 1),
            }
        )
    return rows


def device_cost(cells: Sequence[Cell], rate_mbit: float, speed: float) -> list[dict[str, Any]]:
    """Mean device-side ms per input by piece (slowed by F) and their share of the latency,
    for every strategy at `rate_mbit` (local-only: its one cell)."""
    rows = []
    beside = any(c.strategy == "local" and c.rate_mbit == rate_mbit for c in cells)
    for c in cells:
        if c.rate_mbit not in (None, rate_mbit) or not c.samples:
            continue
        if beside and c.strategy == "local" and c.rate_mbit is None:
            continue  # local-only's run at this rate, not all its runs pooled
        n = len(c.samples)
        pieces: dict[str, float] = {}
        for s in c.samples:
            for k, v in s.device_ms.items():
                pieces[k] = pieces.get(k, 0.0) + speed * v / n
        total = c.mean_ms()
        device = sum(pieces.values())
        rows.append(
            {
                "strategy": c.strategy,
                "transport": c.transport,
                "rate_mbit": c.rate_mbit,
                "pieces_ms": {k: round(v, 4) for k, v in pieces.items()},
                "device_ms": round(device, 4),
                "latency_ms": round(total, 3),
                "device_share": round(device / total, 4) if total else None,
            }
        )
    return rows


def projections(cells: Sequence[Cell], rates: Sequence[float], speed: float) -> dict[str, Any]:
    """Projected mean latency per cell name (strategy, transport), rate and device speed F',
    the fastest at each (rate, F'), and the range of F' where each split + exit variant, on
    each transport, beats local-only and both full offloads."""
    local = next((c for c in cells if c.rate_mbit is None and c.samples), None)
    table: dict[str, dict[str, dict[str, float]]] = {}
    fastest: dict[str, dict[str, str]] = {}
    ranges: dict[str, dict[str, Any]] = {}
    for rate in rates:
        here = [c for c in cells if c.rate_mbit == rate and c.samples]
        if local is not None and not any(c.strategy == "local" for c in here):
            here.append(local)
        if not here:
            continue
        key = f"{rate:g}"
        table[key] = {
            c.name: {
                f"{f:g}": round(c.mean_ms() + (f - speed) * c.device_ms(), 3)
                for f in PROJECTED_SPEEDS
            }
            for c in here
        }
        fastest[key] = {
            f"{f:g}": min(table[key], key=lambda s, f=f: table[key][s][f"{f:g}"])
            for f in PROJECTED_SPEEDS
        }
        ranges[key] = {
            c.name: _winning_range(here, speed, c)
            for c in here
            if c.strategy in ("split-exit", "split-exit-adaptive")
        }
    return {
        "speeds": list(PROJECTED_SPEEDS),
        "latency_ms": table,
        "fastest": fastest,
        "split_exit_wins": ranges,
    }


def _winning_range(cells: Sequence[Cell], speed: float, se: Cell) -> dict[str, Any]:
    """The device speeds F' (from, to; to None: unbounded) where cell `se` is faster than
    local-only and than both full offloads, by the linear projection."""
    by = {c.strategy: c for c in cells if c.transport is None}
    lo, hi = 0.0, float("inf")
    for other in BASELINES:
        o = by.get(other)
        if o is None:
            continue
        # se wins at F' when  t_se + (F' - F) c_se < t_o + (F' - F) c_o
        dt, dc = se.mean_ms() - o.mean_ms(), se.device_ms() - o.device_ms()
        if abs(dc) < 1e-9:
            if dt >= 0:
                lo, hi = float("inf"), 0.0
            continue
        cross = speed - dt / dc
        if dc < 0:  # se needs less device compute: wins on slower devices
            lo = max(lo, cross)
        else:
            hi = min(hi, cross)
    if lo >= hi:
        return {"wins": False}
    return {"wins": True, "from": round(lo, 2), "to": None if hi == float("inf") else round(hi, 2)}


FIXED = ("local", "offload-jpeg95", "offload-png", "split", "split-exit")
BASELINES = ("local", "offload-jpeg95", "offload-png")


def goals(
    cells: Sequence[Cell],
    rates: Sequence[float],
    meant_to_pay: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Per rate and transport: the adaptive policy's mean latency against the best fixed
    strategy's (over every fixed cell at that rate, either transport; goal: within 5%) and
    against the best of local-only and full offload (goal where splitting is meant to pay,
    `meant_to_pay`'s cells from `split_pays.where_split_pays`: at least 30% below), with
    what it did, what its cost model expected, and its link estimate at the end."""
    local = next((c for c in cells if c.strategy == "local" and c.samples), None)
    model = {(m["transport"], m["rate_mbit"]): m for m in meant_to_pay}
    rows = []
    for rate in rates:
        here = [c for c in cells if c.rate_mbit == rate and c.samples]
        if local is not None and not any(c.strategy == "local" for c in here):
            here.append(local)  # local-only ran once, not beside each rate's cells
        fixed = {c.name: c.mean_ms() for c in here if c.strategy in FIXED}
        base = {c.name: c.mean_ms() for c in here if c.strategy in BASELINES}
        if not fixed:
            continue
        best = min(fixed, key=lambda k: fixed[k])
        for adaptive in (c for c in here if c.strategy == "split-exit-adaptive"):
            a = adaptive.mean_ms()
            link = adaptive.extra.get("link") or {}
            row: dict[str, Any] = {
                "rate_mbit": rate,
                "transport": adaptive.transport,
                "adaptive_ms": round(a, 3),
                "expected_ms": adaptive.stats.get("expected_ms"),
                "link_estimate_mbit": round(link["bandwidth_bps"] / 1e6, 3) if link else None,
                "adaptive_accuracy": adaptive.stats["accuracy"],
                "actions": adaptive.stats.get("actions"),
                "best_fixed": best,
                "best_fixed_ms": round(fixed[best], 3),
                "vs_best_fixed_pct": round(100 * (a / fixed[best] - 1), 1),
                "within_5pct": a <= 1.05 * fixed[best],
            }
            if base:
                b = min(base, key=lambda k: base[k])
                row |= {
                    "best_baseline": b,
                    "best_baseline_ms": round(base[b], 3),
                    "vs_best_baseline_pct": round(100 * (a / base[b] - 1), 1),
                    "below_by_30pct": a <= 0.7 * base[b],
                }
            m = model.get((adaptive.transport, rate))
            if m is not None:
                row["split_meant_to_pay"] = {
                    "vs_best_baseline_pct": m["vs_best_baseline_pct"],
                    "pays": m["pays"],
                }
            rows.append(row)
    return rows
