"""What to do with an input no exit was confident about: offload at which (k, bits), or not.

Pure functions of numbers: no I/O, no clocks, no torch. The agent measures, this decides.

    exits passed their thresholds? ── yes ─► exit (decided in the head, before any of this)
                                   └─ no ──► decide(points, costs, rule) ─► offload (k, bits)
                                                                         └─► local (best exit)

An offload at point p is expected to take

    encode + queue + base_latency + server
           + (frame_bytes(p) + overhead - base_bytes) * 8 / bandwidth

where queue is the wait behind requests already in flight, base_latency the time of a small
request of base_bytes (the round trip, with the server's fixed costs when it does not report
them), and overhead the HTTP and protocol bytes around the frame, both ways (all measured:
see `device.estimator`).

Rules (SPINN / Edgent style, one model, many operating points):

* `FixedRule`: always the configured point.
* `AdaptiveRule` with a deadline: the most accurate point expected to answer in time
  (preferring points that meet the accuracy floor); if none can, answer locally now.
* `AdaptiveRule` with only an accuracy floor: the fastest point that meets the floor (or the
  most accurate one if none does).
* `AdaptiveRule` with neither: the most accurate point.

Where the manifest has no measured accuracy for every point, points are ranked by how much
information they carry (channels x bits; ties go to the faster point), and a floor cannot
be checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Action = Literal["offload", "local"]


@dataclass(frozen=True)
class Point:
    """An operating point: k channels at `bits`, its accuracy, its mean frame size."""

    channels: int
    bits: int
    accuracy: float | None
    frame_bytes: float

    @property
    def label(self) -> str:
        return f"k={self.channels},bits={self.bits}"


@dataclass(frozen=True)
class Costs:
    """What the agent measured, as of this decision (seconds, bytes, bits per second)."""

    base_latency_s: float
    bandwidth_bps: float
    server_s: float = 0.0
    encode_s: float = 0.0
    overhead_bytes: float = 0.0
    base_bytes: float = 0.0
    queue_s: float = 0.0


@dataclass(frozen=True)
class FixedRule:
    """Always offload at (channels, bits)."""

    channels: int
    bits: int


@dataclass(frozen=True)
class AdaptiveRule:
    """Choose the point per input; see the module docstring.

    `deadline_s` is the time left for this input (None: no deadline); `local_ok` says a
    local answer exists (the bundle has exits), so "answer locally now" is possible.
    """

    accuracy_floor: float | None = None
    deadline_s: float | None = None
    local_ok: bool = True


@dataclass(frozen=True)
class Decision:
    """Offload at `point` (expected to take `expected_s`), or answer locally; and why."""

    action: Action
    point: Point | None
    expected_s: float | None
    reason: str


def offload_seconds(point: Point, costs: Costs) -> float:
    """Expected seconds from now until the server's answer arrives, offloading at `point`."""
    wire = max(0.0, point.frame_bytes + costs.overhead_bytes - costs.base_bytes)
    transfer = wire * 8.0 / costs.bandwidth_bps if costs.bandwidth_bps > 0 else math.inf
    return costs.encode_s + costs.queue_s + costs.base_latency_s + costs.server_s + transfer


def accuracy_known(points: Sequence[Point]) -> bool:
    """True when every point has a measured accuracy (so floors and rankings use it)."""
    return all(p.accuracy is not None for p in points)


def rank(point: Point, by_accuracy: bool) -> tuple[float, ...]:
    """Sort key, higher is more accurate: measured accuracy, else information carried."""
    proxy = (float(point.channels * point.bits),)
    if by_accuracy:
        return (float(point.accuracy), *proxy)  # type: ignore[arg-type]
    return proxy


def decide(points: Sequence[Point], costs: Costs, rule: FixedRule | AdaptiveRule) -> Decision:
    """The decision for one input that no exit answered. `points` must not be empty."""
    if not points:
        raise ValueError("no operating points to choose from; the bundle lists none")
    if isinstance(rule, FixedRule):
        point = find_point(points, rule.channels, rule.bits)
        return Decision("offload", point, offload_seconds(point, costs), "fixed")
    by_acc = accuracy_known(points)
    timed = [(p, offload_seconds(p, costs)) for p in points]
    floor = rule.accuracy_floor if by_acc else None
    meets = [(p, t) for p, t in timed if floor is None or p.accuracy >= floor]  # type: ignore[operator]

    if rule.deadline_s is not None:
        in_time = [(p, t) for p, t in timed if t <= rule.deadline_s]
        if not in_time and rule.local_ok:
            fastest = min(t for _, t in timed)
            return Decision(
                "local",
                None,
                None,
                f"deadline: fastest offload {fastest:.3f}s > {rule.deadline_s:.3f}s left",
            )
        if not in_time:  # no local answer exists: the fastest offload is the best hope
            p, t = min(timed, key=lambda pt: (pt[1], rank(pt[0], by_acc)))
            return Decision("offload", p, t, "deadline: none in time, fastest")
        pool = [pt for pt in in_time if pt in meets] or in_time
        p, t = max(pool, key=lambda pt: (*rank(pt[0], by_acc), -pt[1]))
        return Decision("offload", p, t, "deadline: most accurate in time")

    if floor is not None:
        if meets:
            p, t = min(meets, key=lambda pt: (pt[1], tuple(-r for r in rank(pt[0], by_acc))))
            return Decision("offload", p, t, "floor: fastest meeting the floor")
        p, t = max(timed, key=lambda pt: rank(pt[0], by_acc))
        return Decision("offload", p, t, "floor: none meets it, most accurate")
    p, t = max(timed, key=lambda pt: (*rank(pt[0], by_acc), -pt[1]))
    return Decision("offload", p, t, "most accurate")


def find_point(points: Sequence[Point], channels: int, bits: int) -> Point:
    """The point (channels, bits); ValueError listing the available ones if absent."""
    for p in points:
        if p.channels == channels and p.bits == bits:
            return p
    have = ", ".join(f"({p.channels}, {p.bits})" for p in points)
    raise ValueError(
        f"(channels={channels}, bits={bits}) is not an operating point of this bundle; "
        f"choose one of {have}"
    )


def best_point(points: Sequence[Point]) -> Point:
    """The most accurate point (the default for the fixed rule)."""
    by_acc = accuracy_known(points)
    return max(points, key=lambda p: (*rank(p, by_acc), -p.frame_bytes))
