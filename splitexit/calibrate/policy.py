"""What a set of exit thresholds does on a calibration table: the early-exit policy, replayed.

    sample ─ exit 1: conf >= t1? ─ yes ─► answered by exit 1
               │ no
             exit 2: conf >= t2? ─ yes ─► answered by exit 2
               │ no
             offload: frame (k, bits) ─ link ─ tail ─► answered by the tail

Exits are tried in order and a sample leaves at the first confident one, exactly as
`splitexit.runtime.head.HeadRunner` does. Expected latency follows the same path: a sample
answered by exit e paid the head segments up to e's and every exit up to e; an offloaded one
paid the whole head, every exit, the encoding, the link and the tail.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .table import CalibrationError, CalibrationTable, Point

NEVER = 1.01  # a threshold above any confidence: the exit is never taken (= bundle NEVER_EXIT)


@dataclass(frozen=True)
class Link:
    """The network between device and tail server.

    `overhead_bytes` is added to every request (HTTP headers and the inference protocol's
    JSON header); 0 counts the frame bytes alone.
    """

    bandwidth_mbps: float
    rtt_ms: float = 20.0
    overhead_bytes: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_mbps > 0:
            raise CalibrationError(
                f"bandwidth must be positive (Mbit/s), got {self.bandwidth_mbps}"
            )
        if self.rtt_ms < 0 or self.overhead_bytes < 0:
            raise CalibrationError("rtt_ms and overhead_bytes must be >= 0")

    @classmethod
    def parse(cls, text: str, overhead_bytes: float = 0.0) -> Link:
        """A link from the emulator's spec syntax, e.g. "5mbit:20ms" (`splitexit.link`)."""
        from splitexit.link import parse_link

        try:
            spec = parse_link(text)
        except ValueError as e:
            raise CalibrationError(str(e)) from None
        if spec.rate_bps is None:
            raise CalibrationError(f"link {text!r} has no rate; give one, e.g. '5mbit:20ms'")
        return cls(spec.rate_bps / 1e6, spec.rtt_s * 1e3, overhead_bytes)

    def transfer_ms(self, nbytes: float | np.ndarray) -> Any:
        """Milliseconds to send `nbytes` plus one round trip."""
        return (nbytes + self.overhead_bytes) * 8.0 / (self.bandwidth_mbps * 1e3) + self.rtt_ms


@dataclass(frozen=True)
class Timings:
    """Milliseconds per piece at batch size 1: head segments, exits, encoding, tail.

    `encode_ms` is quantizing and framing on the device; `tail_ms` is unframing, the decoder
    and the tail stages on the server.
    """

    segment_ms: tuple[float, ...]
    exit_ms: tuple[float, ...]
    tail_ms: float
    encode_ms: float = 0.0

    def scaled(self, device_speed: float) -> Timings:
        """The device-side times multiplied by `device_speed` (e.g. 8.0: a device 8x slower)."""
        if not device_speed > 0:
            raise CalibrationError(f"device_speed must be positive, got {device_speed}")
        return replace(
            self,
            segment_ms=tuple(t * device_speed for t in self.segment_ms),
            exit_ms=tuple(t * device_speed for t in self.exit_ms),
            encode_ms=self.encode_ms * device_speed,
        )

    def check(self, table: CalibrationTable) -> None:
        if len(self.segment_ms) != table.segments or len(self.exit_ms) != len(table.exit_names):
            raise CalibrationError(
                f"timings give {len(self.segment_ms)} segment and {len(self.exit_ms)} exit times; "
                f"the table's bundle has {table.segments} segments and exits "
                f"{list(table.exit_names)}"
            )


@dataclass(frozen=True)
class Outcome:
    """What a policy (thresholds, measure, operating point) gives on a table.

    Rates and accuracies are fractions in [0, 1]. `exit_accuracy[e]` is the accuracy on the
    samples exit e answered (None when it answered none); `tail_on_accepted[e]` is how the
    tail would have done on those same samples. `expected_bytes` is per input (0 for
    samples answered locally); `expected_latency_ms` needs a link and timings.
    """

    thresholds: dict[str, float]
    measure: str
    point: Point
    n: int
    exit_rates: dict[str, float]
    exit_counts: dict[str, int]
    exit_correct: dict[str, int]
    exit_accuracy: dict[str, float | None]
    tail_on_accepted: dict[str, float | None]
    offload_rate: float
    offload_accuracy: float | None
    accuracy: float
    tail_accuracy: float
    expected_bytes: float
    expected_latency_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d["point"] = {"channels": self.point[0], "bits": self.point[1]}
        return {**d, **self.extra}


class Replay:
    """A table prepared for one (measure, point, link, timings): evaluates thresholds fast.

    `stats(thresholds)` is O(N * E) numpy work, which is what threshold search calls often.
    """

    def __init__(
        self,
        table: CalibrationTable,
        measure: str,
        point: Sequence[int] | None = None,
        link: Link | None = None,
        timings: Timings | None = None,
    ) -> None:
        self.table = table
        self.measure = measure
        self.column = table.point_index(point)
        self.point = table.points[self.column]
        self.conf = table.scores(measure)
        self.exit_correct = table.exit_correct
        self.tail_correct = table.tail_correct[:, self.column]
        self.bytes = table.frame_bytes[:, self.column].astype(np.float64)
        self.n, self.e = self.conf.shape
        self.rows = np.arange(self.n)
        self.link, self.timings = link, timings
        self.exit_ms: np.ndarray | None = None
        self.offload_ms: np.ndarray | None = None
        if link is not None and timings is not None:
            timings.check(table)
            seg = np.cumsum(timings.segment_ms)
            ex = np.cumsum(timings.exit_ms)
            self.exit_ms = np.array([seg[s] + ex[i] for i, s in enumerate(table.exit_segments)])
            head = (seg[-1] if len(seg) else 0.0) + (ex[-1] if len(ex) else 0.0)
            self.offload_ms = (
                head + timings.encode_ms + link.transfer_ms(self.bytes) + timings.tail_ms
            )

    def first_exit(self, thresholds: np.ndarray) -> np.ndarray:
        """[N] index of the exit each sample leaves at; E means offloaded."""
        if self.e == 0:
            return np.zeros(self.n, np.int64)
        take = self.conf >= thresholds[None, :]
        return np.where(take.any(axis=1), take.argmax(axis=1), self.e)

    def stats(self, thresholds: np.ndarray) -> dict[str, Any]:
        """Counts and totals for one threshold vector (in exit order)."""
        first = self.first_exit(np.asarray(thresholds, dtype=np.float64))
        exited = first < self.e
        correct = np.where(
            exited,
            self.exit_correct[self.rows, np.minimum(first, self.e - 1)] if self.e else False,
            self.tail_correct,
        )
        counts = np.bincount(first, minlength=self.e + 1)
        hits = np.bincount(first, weights=correct, minlength=self.e + 1)
        tail_hits = np.bincount(first, weights=self.tail_correct, minlength=self.e + 1)
        off = ~exited
        out = {
            "first": first,
            "counts": counts,
            "hits": hits,
            "tail_hits": tail_hits,
            "accuracy": float(correct.mean()) if self.n else 0.0,
            "offload": float(off.mean()) if self.n else 0.0,
            "bytes": float(self.bytes[off].sum() / self.n) if self.n else 0.0,
            "latency": None,
        }
        if self.exit_ms is not None and self.offload_ms is not None and self.n:
            lat = np.where(
                exited,
                self.exit_ms[np.minimum(first, self.e - 1)] if self.e else 0.0,
                self.offload_ms,
            )
            out["latency"] = float(lat.mean())
        return out

    def outcome(self, thresholds: Sequence[float] | np.ndarray) -> Outcome:
        """The full `Outcome` of a threshold vector (in exit order)."""
        thr = np.asarray(thresholds, dtype=np.float64)
        s = self.stats(thr)
        names = self.table.exit_names
        counts, hits, tail_hits = s["counts"], s["hits"], s["tail_hits"]
        n = max(self.n, 1)
        overhead = self.link.overhead_bytes if self.link is not None else 0.0
        return Outcome(
            thresholds={name: float(t) for name, t in zip(names, thr, strict=True)},
            measure=self.measure,
            point=self.point,
            n=self.n,
            exit_rates={name: float(counts[i] / n) for i, name in enumerate(names)},
            exit_counts={name: int(counts[i]) for i, name in enumerate(names)},
            exit_correct={name: int(hits[i]) for i, name in enumerate(names)},
            exit_accuracy={
                name: (float(hits[i] / counts[i]) if counts[i] else None)
                for i, name in enumerate(names)
            },
            tail_on_accepted={
                name: (float(tail_hits[i] / counts[i]) if counts[i] else None)
                for i, name in enumerate(names)
            },
            offload_rate=s["offload"],
            offload_accuracy=float(hits[-1] / counts[-1]) if counts[-1] else None,
            accuracy=s["accuracy"],
            tail_accuracy=float(self.tail_correct.mean()) if self.n else 0.0,
            expected_bytes=s["bytes"] + overhead * s["offload"],
            expected_latency_ms=s["latency"],
        )


def evaluate_policy(
    table: CalibrationTable,
    thresholds: Mapping[str, float],
    *,
    measure: str = "max_prob",
    point: Sequence[int] | None = None,
    link: Link | None = None,
    timings: Timings | None = None,
) -> Outcome:
    """Replay `thresholds` (by exit name; missing exits are never taken) on a table."""
    unknown = sorted(set(thresholds) - set(table.exit_names))
    if unknown:
        raise CalibrationError(f"no exits named {unknown}; the table's exits: {table.exit_names}")
    thr = [float(thresholds.get(name, NEVER)) for name in table.exit_names]
    return Replay(table, measure, point, link, timings).outcome(thr)


# ----------------------------------------------------------------------------- timings


def median_ms(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of `fn()` in milliseconds, after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def measure_timings(
    bundle: Any, *, repeats: int = 20, warmup: int = 3, point: Sequence[int] | None = None
) -> Timings:
    """Time a bundle's pieces on this machine at batch size 1 (median of `repeats`).

    Multiply the device side by a speed factor with `Timings.scaled` for a slower device.
    `point` (k, bits) is what the encoding is timed at (default all channels, most bits).
    """
    from splitexit.bottleneck import dequantize, quantize, zero_fill
    from splitexit.codec import encode_frame

    m = bundle.manifest
    b = m.bottleneck
    k, bits = (b.channels, max(b.bits)) if point is None else (int(point[0]), int(point[1]))
    cuda = bundle.device.type == "cuda"

    def ms(fn: Callable[[], Any]) -> float:
        def call() -> None:
            fn()
            if cuda:  # kernels run asynchronously: wait for them
                torch.cuda.synchronize(bundle.device)

        return median_ms(call, repeats=repeats, warmup=warmup)

    f = torch.zeros((1, *m.input_shape), device=bundle.device)
    features, segment_ms = [], []
    for segment in bundle.segments:
        segment_ms.append(ms(lambda s=segment, f=f: s(f)))
        f = segment(f)
        features.append(f)
    exit_ms = [
        ms(lambda branch=bundle.exits[spec.name], f=features[spec.segment]: branch(f))
        for spec in m.exits
    ]
    z = features[-1]

    def encode() -> bytes:  # what a device does to send z: quantize, pack, compress
        qt = quantize(z[:, :k], bits, channels=b.channels)
        return encode_frame(
            qt, bundle.fingerprint, level=m.codec.zstd_level, dictionary=bundle.dictionary
        )

    code = zero_fill(dequantize(quantize(z[:, :k], bits, channels=b.channels)), b.channels)
    return Timings(
        segment_ms=tuple(segment_ms),
        exit_ms=tuple(exit_ms),
        tail_ms=ms(lambda: bundle.tail(code)),
        encode_ms=ms(encode),
    )
