"""What a set of exit thresholds does on a calibration table: the early-exit policy, replayed.

    sample ─ exit 1: conf >= t1? ─ yes ─► answered by exit 1
               │ no
             exit 2: conf >= t2? ─ yes ─► answered by exit 2
               │ no
             offload: frame (k, bits) ─ link ─ tail ─► answered by the tail

Exits are tried in order and a sample leaves at the first confident one, exactly as
`splitexit.runtime.head.HeadRunner` does. Expected latency is priced by the one cost model
(`splitexit.cost.CostModel`, as the device agent prices its actions): a sample answered by
exit e paid the head segments up to e's and every exit up to e; an offloaded one paid the
whole head, every exit, then the offload (encoding, the link, the server's tail).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch

from splitexit.bundle.manifest import OperatingPoint
from splitexit.cost import Compute, CostModel

from .table import CalibrationError, CalibrationTable

NEVER = 1.01  # a threshold above any confidence: the exit is never taken (= bundle NEVER_EXIT)


def check_compute(compute: Compute, table: CalibrationTable) -> None:
    """Raise CalibrationError unless `compute` times the table's segments and exits."""
    if len(compute.segment_s) != table.segments or len(compute.exit_s) != len(table.exit_names):
        raise CalibrationError(
            f"timings give {len(compute.segment_s)} segment and {len(compute.exit_s)} exit "
            f"times; the table's bundle has {table.segments} segments and exits "
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
    point: OperatingPoint
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
        d["point"] = {"channels": self.point.channels, "bits": self.point.bits}
        return {**d, **self.extra}


class Replay:
    """A table prepared for one (measure, point, cost model): evaluates thresholds fast.

    `stats(thresholds)` is O(N * E) numpy work, which is what threshold search calls often.
    """

    def __init__(
        self,
        table: CalibrationTable,
        measure: str,
        point: Sequence[int] | OperatingPoint | None = None,
        cost: CostModel | None = None,
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
        self.cost = cost
        self.exit_ms: np.ndarray | None = None
        self.offload_ms: np.ndarray | None = None
        if cost is not None:
            check_compute(cost.device, table)
            cost = replace(cost, exit_segments=table.exit_segments)
            self.exit_ms = 1e3 * np.array([cost.exit_s(i) for i in range(self.e)])
            self.offload_ms = 1e3 * (cost.bottleneck_s() + cost.offload_s(self.bytes))

    def first_exit(self, thresholds: np.ndarray) -> np.ndarray:
        """[N] index of the exit each sample leaves at; E means offloaded."""
        if self.e == 0:
            return np.zeros(self.n, np.int64)
        take = self.conf >= thresholds[None, :]
        index: np.ndarray = np.where(take.any(axis=1), take.argmax(axis=1), self.e)
        return index

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
        overhead = self.cost.link.overhead_bytes if self.cost is not None else 0.0
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
    point: Sequence[int] | OperatingPoint | None = None,
    cost: CostModel | None = None,
) -> Outcome:
    """Replay `thresholds` (by exit name; missing exits are never taken) on a table."""
    unknown = sorted(set(thresholds) - set(table.exit_names))
    if unknown:
        raise CalibrationError(f"no exits named {unknown}; the table's exits: {table.exit_names}")
    thr = [float(thresholds.get(name, NEVER)) for name in table.exit_names]
    return Replay(table, measure, point, cost).outcome(thr)


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
def measure_compute(
    bundle: Any, *, repeats: int = 20, warmup: int = 3, point: Sequence[int] | None = None
) -> Compute:
    """Time a bundle's pieces on this machine at batch size 1 (median of `repeats`), in
    seconds: head segments, exits, encoding at `point` (k, bits; default all channels, most
    bits) and the tail on the dequantized code. `Compute.scaled` makes it a slower device's."""
    from splitexit.bottleneck import dequantize, quantize, zero_fill
    from splitexit.codec import encode_frame

    m = bundle.manifest
    b = m.bottleneck
    k, bits = (b.channels, max(b.bits)) if point is None else (int(point[0]), int(point[1]))
    cuda = bundle.device.type == "cuda"

    def seconds(fn: Callable[[], Any]) -> float:
        def call() -> None:
            fn()
            if cuda:  # kernels run asynchronously: wait for them
                torch.cuda.synchronize(bundle.device)

        return median_ms(call, repeats=repeats, warmup=warmup) / 1e3

    f = torch.zeros((1, *m.input_shape), device=bundle.device)
    features, segment_s = [], []
    for segment in bundle.segments:
        segment_s.append(seconds(partial(segment, f)))
        f = segment(f)
        features.append(f)
    exit_s = [seconds(partial(bundle.exits[spec.name], features[spec.segment])) for spec in m.exits]
    z = features[-1]

    def encode() -> bytes:  # what a device does to send z: quantize, pack, compress
        qt = quantize(z[:, :k], bits, channels=b.channels)
        return encode_frame(
            qt, bundle.fingerprint, level=m.codec.zstd_level, dictionary=bundle.dictionary
        )

    code = zero_fill(dequantize(quantize(z[:, :k], bits, channels=b.channels)), b.channels)
    return Compute(
        segment_s=tuple(segment_s),
        exit_s=tuple(exit_s),
        tail_s=seconds(lambda: bundle.tail(code)),
        encode_s=seconds(encode),
    )
