"""One JSON line per input, and the summary of a run.

A record (keys in this order; absent values are null):

    {"id": "Coat/0042.png", "class": 4, "class_name": "Coat", "confidence": 0.91,
     "decided_by": "server", "action": "offload", "exit": null, "reason": null,
     "channels": 4, "bits": 4, "frame_bytes": 69, "overhead_bytes": 341,
     "response_bytes": 236, "attempts": 1, "label": 4, "expected_ms": 9.5,
     "timings_ms": {"head": 3.1, "encode": 0.2, "network": 5.0, "server": 1.2, "tail": 0.6,
                    "total": 9.8},
     "source": "/data/Coat/0042.png", "error": null}

`decided_by` is the exit that answered ("layer1", ...), "server", "device" (the tail ran
here), "fallback" (an offload that could not happen or failed: the best exit answered,
named in `exit`, and `reason` says why) or "error" (the input could not be read; `error`
says why, `class` is null). `action` is what the policy chose (`splitexit.cost.ACTIONS`):
"image" (sent the image, `reason` says in what format, e.g. "image/png"; `frame_bytes`
counts it), "exit" (an exit's threshold passed),
"offload" (at `channels` x `bits`), "tail" (finished the tail here), "local" (the best
exit now). `expected_ms` is the input's total time the cost model expected when it chose;
`timings_ms.total` is what it took.
`reason` for an exit: "threshold" (its confidence passed the threshold) or "deadline" (the
adaptive policy answered locally because no offload could meet the deadline). `reason` for
a fallback: "timeout" (an attempt timed out), "deadline" (the input's deadline passed),
"unreachable", "server_error" (5xx or garbage, after retries), "busy" (429 / 503 / 504, or
its Retry-After still running), "circuit_open", "rejected" (400 / 413), "fingerprint" (409:
offloading stopped), "refused" (401 / 403 / 404: stopped), "local_only", "interrupted"
(Ctrl-C while the frame was in flight).
`frame_bytes` is the frame alone; `overhead_bytes` the rest of the request on the wire
(HTTP/1.1 request line and headers, the inference JSON header, the BYTES length prefix),
summed over attempts; `response_bytes` the whole response. TCP/IP headers are not counted.
Timings: `network` is the successful request's round trip minus `server` (the server's own
time, null unless the server reports it); `tail` is the part of `server` spent computing
(the tail model on the request's batch; null unless reported), or the tail's time here;
`encode` is framing the code or encoding the image; `total` runs from taking the input to
its record.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

SERVER = "server"
DEVICE = "device"
FALLBACK = "fallback"
ERROR = "error"
TIMING_KEYS = ("head", "encode", "network", "server", "tail", "total")


@dataclass
class Record:
    """The result for one input; see the module docstring for the fields."""

    id: str
    decided_by: str
    action: str | None = None
    prediction: int | None = None
    class_name: str | None = None
    confidence: float | None = None
    exit: str | None = None
    reason: str | None = None
    channels: int | None = None
    bits: int | None = None
    frame_bytes: int = 0
    overhead_bytes: int = 0
    response_bytes: int = 0
    attempts: int = 0
    label: int | None = None
    expected_ms: float | None = None
    timings_ms: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS))
    source: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "class": self.prediction,
            "class_name": self.class_name,
            "confidence": _round(self.confidence, 6),
            "decided_by": self.decided_by,
            "action": self.action,
            "exit": self.exit,
            "reason": self.reason,
            "channels": self.channels,
            "bits": self.bits,
            "frame_bytes": self.frame_bytes,
            "overhead_bytes": self.overhead_bytes,
            "response_bytes": self.response_bytes,
            "attempts": self.attempts,
            "label": self.label,
            "expected_ms": _round(self.expected_ms, 3),
            "timings_ms": {k: _round(self.timings_ms.get(k), 3) for k in TIMING_KEYS},
            "source": self.source,
            "error": self.error,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @property
    def offloaded(self) -> bool:
        return self.decided_by == SERVER


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


class RecordWriter:
    """Writes records as JSON lines, one flush per line (so `tail -f` shows progress)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def write(self, record: Record) -> None:
        self.stream.write(record.to_json() + "\n")
        self.stream.flush()


class Summary:
    """Running statistics over records; `to_dict()` for machines, `format()` for people."""

    def __init__(self, exit_names: Sequence[str] = ()) -> None:
        self.exit_names = list(exit_names)
        self.inputs = 0
        self.decided: Counter[str] = Counter()
        self.fallback_reasons: Counter[str] = Counter()
        self.points: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.expected_error_ms: list[float] = []
        self.latencies_ms: list[float] = []
        self.frame_bytes = 0
        self.overhead_bytes = 0
        self.response_bytes = 0
        self.labeled = 0
        self.correct = 0
        self.retries = 0
        self.local_for_deadline = 0
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.extra: dict[str, Any] = {}

    def add(self, r: Record) -> None:
        self.inputs += 1
        self.decided[r.decided_by] += 1
        if r.decided_by == FALLBACK:
            self.fallback_reasons[r.reason or "unknown"] += 1
        elif r.reason == "deadline":
            self.local_for_deadline += 1
        if r.decided_by == SERVER:
            self.points[f"{r.channels}x{r.bits}"] += 1
        total = r.timings_ms.get("total")
        if total is not None:
            self.latencies_ms.append(total)
        if r.action is not None:
            self.actions[r.action] += 1
        if r.expected_ms is not None and total is not None:
            self.expected_error_ms.append(total - r.expected_ms)
        self.frame_bytes += r.frame_bytes
        self.overhead_bytes += r.overhead_bytes
        self.response_bytes += r.response_bytes
        self.retries += max(0, r.attempts - 1)
        if r.label is not None and r.prediction is not None:
            self.labeled += 1
            self.correct += int(r.label == r.prediction)

    def finish(self) -> None:
        self.finished = time.perf_counter()

    def to_dict(self) -> dict[str, Any]:
        n = self.inputs
        wall = (self.finished or time.perf_counter()) - self.started
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        err = np.asarray(self.expected_error_ms, dtype=np.float64)
        offloads = self.decided[SERVER]
        exits = {name: self.decided[name] for name in self.exit_names}
        return {
            "inputs": n,
            "exits": exits,
            "exit_rate": {k: _rate(v, n) for k, v in exits.items()},
            "local_for_deadline": self.local_for_deadline,
            "offloaded": offloads,
            "offload_rate": _rate(offloads, n),
            "tail_here": self.decided[DEVICE],  # the tail finished on this device
            "fallbacks": self.decided[FALLBACK],
            "fallback_rate": _rate(self.decided[FALLBACK], n),
            "fallback_reasons": dict(self.fallback_reasons),
            "errors": self.decided[ERROR],
            "retries": self.retries,
            "operating_points": dict(self.points),
            "actions": dict(self.actions),
            "actual_minus_expected_ms": {
                "mean": _stat(err, np.mean),
                "p50": _stat(err, lambda a: np.percentile(a, 50)),
            },
            "latency_ms": {
                "mean": _stat(lat, np.mean),
                "p50": _stat(lat, lambda a: np.percentile(a, 50)),
                "p95": _stat(lat, lambda a: np.percentile(a, 95)),
                "max": _stat(lat, np.max),
            },
            "bytes_sent": {
                "frame": self.frame_bytes,
                "overhead": self.overhead_bytes,
                "total": self.frame_bytes + self.overhead_bytes,
                "frame_per_offload": _rate(self.frame_bytes, offloads, 1),
            },
            "bytes_received": self.response_bytes,
            "accuracy": _rate(self.correct, self.labeled),
            "labeled": self.labeled,
            "wall_s": round(wall, 3),
            "inputs_per_s": _rate(n, wall, 2),
            **self.extra,
        }

    def format(self) -> str:
        """A few readable lines."""
        d = self.to_dict()
        lines = [f"inputs        {d['inputs']} in {d['wall_s']:.1f} s ({d['inputs_per_s']}/s)"]
        for name, count in d["exits"].items():
            lines.append(f"exit {name:<9}{count:>6}  ({_pct(d['exit_rate'][name])})")
        if d["local_for_deadline"]:
            lines.append(
                f"  (of which answered locally to meet the deadline: {d['local_for_deadline']})"
            )
        lines.append(f"offloaded     {d['offloaded']:>6}  ({_pct(d['offload_rate'])})")
        if d["operating_points"]:
            mix = ", ".join(f"{k}: {v}" for k, v in sorted(d["operating_points"].items()))
            lines.append(f"  (k x bits)  {mix}")
        if d["tail_here"]:
            lines.append(
                f"tail here     {d['tail_here']:>6}  ({_pct(_rate(d['tail_here'], d['inputs']))})"
            )
        if d["actions"]:
            mix = ", ".join(f"{k}: {v}" for k, v in sorted(d["actions"].items()))
            lines.append(f"actions       {mix}")
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(d["fallback_reasons"].items()))
        lines.append(
            f"fallbacks     {d['fallbacks']:>6}  ({_pct(d['fallback_rate'])})"
            + (f"  [{reasons}]" if reasons else "")
        )
        if d["errors"]:
            lines.append(f"errors        {d['errors']:>6}")
        lat = d["latency_ms"]
        if lat["mean"] is not None:
            lines.append(
                f"latency ms    mean {lat['mean']:.1f}  p50 {lat['p50']:.1f}  "
                f"p95 {lat['p95']:.1f}  max {lat['max']:.1f}"
            )
        b = d["bytes_sent"]
        per = f", {b['frame_per_offload']:.0f} B/frame" if b["frame_per_offload"] else ""
        lines.append(
            f"bytes sent    {b['total']} (frames {b['frame']} + overhead {b['overhead']}{per}), "
            f"received {d['bytes_received']}"
        )
        if d["accuracy"] is not None:
            lines.append(f"accuracy      {d['accuracy']:.4f} on {d['labeled']} labeled inputs")
        link = d.get("link")
        if link:
            lines.append(
                f"link estimate {link['bandwidth_bps'] / 1e6:.3g} Mbit/s, "
                f"base latency {link['base_latency_s'] * 1e3:.1f} ms"
            )
        return "\n".join(lines)


def _rate(a: float, b: float, digits: int = 4) -> float | None:
    return round(a / b, digits) if b else None


def _stat(a: np.ndarray, f: Any) -> float | None:
    return round(float(f(a)), 3) if a.size else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
