"""The agent's settings, and what the bundle says about the choices it has.

`AgentConfig` says how the agent decides (fixed or adaptive policy, deadline, accuracy
floor, exit thresholds, whether and how it may send images) and how much it keeps in
flight; `operating_points` reads the (k channels, bits) grid a bundle supports, with the
accuracy and frame size the manifest measured (or, where it did not, the frame's size
bound); `float_accuracy` and `exit_rates` the calibration's numbers the agent starts from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from splitexit.bundle import Bundle, OperatingPoint
from splitexit.codec import HEADER_SIZE, QPARAM_SIZE
from splitexit.runtime.backends import RuntimeOptions


@dataclass(frozen=True)
class AgentConfig:
    """How the agent decides and how much it keeps in flight.

    Args:
        policy: "fixed" (always `channels` x `bits`) or "adaptive" (see `splitexit_device.policy`).
        channels, bits: the fixed rule's operating point (default: the most accurate).
        deadline_s: per-input latency budget; the adaptive rule answers locally when no
            offload can meet it, and it bounds every request's retries.
        accuracy_floor: the adaptive rule's minimum accuracy for an operating point.
        thresholds: exit thresholds overriding the bundle's.
        window: most frames in flight at once.
        local_only: never offload (inputs no exit takes get the best exit's answer).
        probe_interval_s: time the link with a small request this often (0: never).
        explore_s: the adaptive rule takes an action it has not taken for this long (the
            head, with every exit that can answer, or the tail here) once, so that a stale
            estimate of its cost cannot keep it from being chosen (0: never).
        images: the adaptive rule may send the image (when the server takes images), in
            any of `image_formats` (the expected-fastest; JPEG and WebP at `image_quality`).
        tail_here: the device may finish the tail itself, running the bundle's tail on the
            head's runtime (`splitexit-device` turns it on unless `--no-tail`).
        breaker_failures, breaker_reset_s, breaker_max_reset_s: see `splitexit_device.breaker`.
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
    explore_s: float = 5.0
    images: bool = True
    tail_here: bool = False
    image_formats: tuple[str, ...] = ("png", "jpeg")
    image_quality: int = 95
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
        if not self.probe_interval_s >= 0:
            raise ValueError(f"probe interval must be >= 0 seconds, got {self.probe_interval_s}")
        if not self.explore_s >= 0:
            raise ValueError(f"explore_s must be >= 0 seconds, got {self.explore_s}")


def operating_points(bundle: Bundle) -> list[OperatingPoint]:
    """The bundle's operating points with a frame-size prior (manifest, else the raw bound)."""
    m = bundle.manifest
    b = m.bottleneck
    listed = m.operating_points or tuple(OperatingPoint(b.channels, bits) for bits in b.bits)
    _, h, w = b.code_shape
    points = []
    for p in listed:
        raw = HEADER_SIZE + QPARAM_SIZE + math.ceil(p.channels * h * w * p.bits / 8)
        points.append(replace(p, frame_bytes=float(p.frame_bytes) if p.frame_bytes else float(raw)))
    return points


def float_accuracy(bundle: Bundle) -> float | None:
    """The accuracy of the tail on the float code (finishing the tail here), if measured."""
    acc = bundle.manifest.metrics.get("float_accuracy")
    return float(acc) if isinstance(acc, (int, float)) else None


def exit_rates(
    bundle: Bundle, thresholds: Mapping[str, float] | None = None, unknown: float = 0.5
) -> tuple[float, ...]:
    """How often each exit answers at the `thresholds` in use (default the manifest's): the
    calibration's rate where it measured these thresholds, 0 for a disabled exit (threshold
    above 1), else `unknown`, so that an exit the agent knows nothing of is run and learned."""
    m = bundle.manifest
    cal = (m.metrics.get("calibration") or {}).get("calibration") or {}
    rates = cal.get("exit_rates") or {}
    calibrated = dict(m.thresholds)
    used = {**calibrated, **(thresholds or {})}
    out = []
    for e in m.exits:
        t = used.get(e.name)
        if t is not None and t > 1.0:
            out.append(0.0)
        elif e.name in rates and t == calibrated.get(e.name):
            out.append(float(rates[e.name]))
        else:
            out.append(unknown)
    return tuple(out)
