"""One measured input (`Sample`) and the statistics of a cell of them (`summarize`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEVICE_PIECES = ("preprocess", "head", "exits", "quantize", "frame", "image_encode", "tail")


@dataclass
class Sample:
    """One input through one strategy at one link rate.

    `answered_by`: "device" (local-only), "server", an exit's name, "fallback" or "error".
    `device_ms`: compute on the device by piece (keys from DEVICE_PIECES) as measured on this
    machine, before any `--device-speed` slowdown (the run slept the extra on top of it).
    Bytes are as HTTP/1.1 puts them on the wire (TCP/IP headers not counted); `payload_bytes`
    is the frame or the image alone. `network_ms` is the request's round trip less
    `server_ms`, the server's own time (its `Server-Timing`; None if it did not say), of
    which `tail_ms` computing (its `compute`). `action` and `expected_ms` are the agent's
    record's (split strategies only).
    """

    id: str
    total_ms: float
    correct: bool | None
    answered_by: str
    point: str | None = None
    payload_bytes: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    network_ms: float | None = None
    device_ms: dict[str, float] = field(default_factory=dict)
    server_ms: float | None = None
    tail_ms: float | None = None
    action: str | None = None  # the agent's: image, exit, offload, tail, local
    expected_ms: float | None = None  # the agent's cost model's, when it chose

    @property
    def offloaded(self) -> bool:
        return self.answered_by == "server"


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """Latency (mean, p50, p95), accuracy, bytes per input and who answered, for one cell."""
    n = len(samples)
    if not n:
        return {"inputs": 0}
    lat = np.array([s.total_ms for s in samples])
    labeled = [s for s in samples if s.correct is not None]
    offloaded = [s for s in samples if s.offloaded]
    answered = Counter(s.answered_by for s in samples)
    return {
        "inputs": n,
        "latency_ms": {
            "mean": _r(lat.mean()),
            "p50": _r(np.percentile(lat, 50)),
            "p95": _r(np.percentile(lat, 95)),
            "max": _r(lat.max()),
        },
        "accuracy": _r(np.mean([s.correct for s in labeled]), 4) if labeled else None,
        "offload_rate": _r(len(offloaded) / n, 4),
        "answered_by": dict(sorted(answered.items())),
        "points": dict(sorted(Counter(s.point for s in offloaded if s.point).items())),
        "actions": dict(sorted(Counter(s.action for s in samples if s.action).items())),
        "expected_ms": _r(np.mean(expected)) if (expected := _expected(samples)) else None,
        "bytes_per_input": {
            "payload": _r(sum(s.payload_bytes for s in samples) / n, 1),
            "request": _r(sum(s.request_bytes for s in samples) / n, 1),
            "response": _r(sum(s.response_bytes for s in samples) / n, 1),
        },
        "payload_per_offload": _r(np.mean([s.payload_bytes for s in offloaded]), 1)
        if offloaded
        else None,
        "device_ms": {
            k: _r(sum(s.device_ms.get(k, 0.0) for s in samples) / n, 4)
            for k in DEVICE_PIECES
            if any(k in s.device_ms for s in samples)
        },
    }


def _expected(samples: Sequence[Sample]) -> list[float]:
    """The expected totals of the samples that have one."""
    return [float(s.expected_ms) for s in samples if s.expected_ms is not None]
