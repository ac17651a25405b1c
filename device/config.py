"""The agent's settings, and the operating points it chooses from.

`AgentConfig` says how the agent decides (fixed or adaptive policy, deadline, accuracy
floor, exit thresholds) and how much it keeps in flight; `operating_points` reads the
(k channels, bits) grid a bundle supports, with the accuracy and frame size the manifest
measured (or, where it did not, the frame's size bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from splitexit.bundle import Bundle
from splitexit.codec import HEADER_SIZE, QPARAM_SIZE
from splitexit.runtime.backends import RuntimeOptions

from .policy import Point


@dataclass(frozen=True)
class AgentConfig:
    """How the agent decides and how much it keeps in flight.

    Args:
        policy: "fixed" (always `channels` x `bits`) or "adaptive" (see `device.policy`).
        channels, bits: the fixed rule's operating point (default: the most accurate).
        deadline_s: per-input latency budget; the adaptive rule answers locally when no
            offload can meet it, and it bounds every request's retries.
        accuracy_floor: the adaptive rule's minimum accuracy for an operating point.
        thresholds: exit thresholds overriding the bundle's.
        window: most frames in flight at once.
        local_only: never offload (inputs no exit takes get the best exit's answer).
        probe_interval_s: time the link with a small request this often (0: never).
        breaker_failures, breaker_reset_s, breaker_max_reset_s: see `device.breaker`.
        runtime: what runs the head (`splitexit.runtime.backends`; default auto: onnxruntime
            when installed and the bundle has ONNX graphs, else TorchScript).
    """

    policy: Literal["fixed", "adaptive"] = "adaptive"
    channels: int | None = None
    bits: int | None = None
    deadline_s: float | None = None
    accuracy_floor: float | None = None
    thresholds: Mapping[str, float] | None = None
    window: int = 4
    local_only: bool = False
    probe_interval_s: float = 0.5
    breaker_failures: int = 3
    breaker_reset_s: float = 0.5
    breaker_max_reset_s: float = 10.0
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    def __post_init__(self) -> None:
        if self.policy not in ("fixed", "adaptive"):
            raise ValueError(f"policy must be 'fixed' or 'adaptive', got {self.policy!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"deadline must be > 0, got {self.deadline_s}")
        if self.accuracy_floor is not None and not 0 <= self.accuracy_floor <= 1:
            raise ValueError(f"accuracy floor must be in [0, 1], got {self.accuracy_floor}")


def operating_points(bundle: Bundle) -> list[Point]:
    """The bundle's operating points with a frame-size prior (manifest, else the raw bound)."""
    m = bundle.manifest
    b = m.bottleneck
    listed = m.operating_points or ()
    specs = [(p.channels, p.bits, p.accuracy, p.frame_bytes) for p in listed]
    if not specs:
        specs = [(b.channels, bits, None, None) for bits in b.bits]
    _, h, w = b.code_shape
    points = []
    for k, bits, acc, size in specs:
        raw = HEADER_SIZE + QPARAM_SIZE + math.ceil(k * h * w * bits / 8)
        points.append(Point(k, bits, acc, float(size) if size else float(raw)))
    return points
