"""Prometheus metrics in the text exposition format (0.0.4), without a client library.

    Counter / Gauge / Histogram ─ labelled series ─ Registry.render() ─► GET /metrics

Thread-safe (worker threads observe durations while the event loop counts requests). The
server's set mirrors Triton's (`nv_inference_*`): requests by outcome, inference count vs
execution count (so batching efficiency shows), pending requests, queue / decode / compute /
total durations, plus bytes received and the (channels, bits) mix of the frames.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, object]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        lines = self.header()
        lines += [f"{self.name}{_format_labels(self.labelnames, k)} {_number(v)}" for k, v in items]
        return lines


class Gauge(_Metric):
    """A value that goes up and down, set directly or read from a callback at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[Labels, float] = {}
        self._callbacks: dict[Labels, Callable[[], float]] = {}

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def set_function(self, fn: Callable[[], float], **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._callbacks[key] = fn

    def render(self) -> list[str]:
        with self._lock:
            values = dict(self._values)
            callbacks = dict(self._callbacks)
        for key, fn in callbacks.items():
            try:
                values[key] = float(fn())
            except Exception:  # a broken callback must not break the scrape
                values[key] = math.nan
        lines = self.header()
        for k, v in sorted(values.items()):
            lines.append(f"{self.name}{_format_labels(self.labelnames, k)} {_number(v)}")
        return lines


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = DURATION_BUCKETS,
    ) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            total[0] += value

    def counts(self, **labels: object) -> dict[float, int]:
        """Non-cumulative count per bucket upper bound (+Inf last), for tests and tools."""
        with self._lock:
            counts, _ = self._series.get(self._key(labels), ([0] * (len(self.buckets) + 1), [0]))
            return dict(zip((*self.buckets, math.inf), list(counts), strict=True))

    def render(self) -> list[str]:
        with self._lock:
            series = {k: (list(c), t[0]) for k, (c, t) in sorted(self._series.items())}
        lines = self.header()
        for key, (counts, total) in series.items():
            cumulative = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += n
                le = f'le="{_number(bound)}"'
                lines.append(
                    f"{self.name}_bucket{_format_labels(self.labelnames, key, le)} {cumulative}"
                )
            labels = _format_labels(self.labelnames, key)
            lines.append(f"{self.name}_sum{labels} {_number(total)}")
            lines.append(f"{self.name}_count{labels} {cumulative}")
        return lines


_M = TypeVar("_M", bound=_Metric)


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _M) -> _M:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.render()
        return "\n".join(lines) + "\n"


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ServerMetrics:
    """The tail server's metrics, one registry per app."""

    def __init__(self) -> None:
        self.registry = r = Registry()
        m, o = ("model",), ("model", "outcome")
        self.http_requests = r.add(Counter(
            "splitexit_http_requests_total", "HTTP requests by route, method and status code",
            ("route", "method", "code"),
        ))  # fmt: skip
        self.requests = r.add(Counter(
            "splitexit_inference_requests_total",
            "inference requests by model and outcome (success, bad_request, fingerprint_mismatch, "
            "too_large, overloaded, not_ready, timeout, client_timeout, unauthorized, "
            "client_disconnect, error)", o,
        ))  # fmt: skip
        self.inference_count = r.add(Counter(
            "splitexit_inference_count_total", "samples inferred (a batch of n counts n)", m
        ))  # fmt: skip
        self.execution_count = r.add(Counter(
            "splitexit_inference_exec_count_total", "tail executions (one per batch)", m
        ))  # fmt: skip
        self.batch_size = r.add(Histogram(
            "splitexit_batch_size", "samples per tail execution", m, BATCH_BUCKETS
        ))  # fmt: skip
        self.pending = r.add(Gauge(
            "splitexit_pending_requests", "inference requests queued or running", m
        ))  # fmt: skip
        self.queue_duration = r.add(Histogram(
            "splitexit_queue_duration_seconds", "time a request waited for its batch", m
        ))  # fmt: skip
        self.decode_duration = r.add(Histogram(
            "splitexit_decode_duration_seconds", "frame / image decoding time per batch", m
        ))  # fmt: skip
        self.compute_duration = r.add(Histogram(
            "splitexit_compute_duration_seconds", "model time per batch (head for images, tail)", m
        ))  # fmt: skip
        self.request_duration = r.add(Histogram(
            "splitexit_request_duration_seconds", "inference request time, body read to answer", m
        ))  # fmt: skip
        self.received_bytes = r.add(Counter(
            "splitexit_received_bytes_total", "request body bytes received by model", m
        ))  # fmt: skip
        self.frame_bytes = r.add(Counter(
            "splitexit_frame_bytes_total", "frame bytes received by model", m
        ))  # fmt: skip
        self.frames = r.add(Counter(
            "splitexit_frames_total", "frames by operating point (channels sent, bits)",
            ("model", "channels", "bits"),
        ))  # fmt: skip
        self.model_ready = r.add(Gauge(
            "splitexit_model_ready", "1 when the model is loaded and warmed up", m
        ))  # fmt: skip
        self.rss = r.add(Gauge("process_resident_memory_bytes", "resident memory in bytes"))
        self.rss.set_function(_rss_bytes)
        self.start_time = r.add(Gauge("process_start_time_seconds", "start time, unix seconds"))
        self.start_time.set(time.time())

    def render(self) -> str:
        return self.registry.render()
