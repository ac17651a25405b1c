"""Prometheus metrics, kept by `prometheus_client` in one registry per app.

    Counter / Gauge / Histogram ─ children ─ CollectorRegistry ─ generate_latest ─► GET /metrics

The wrappers here only let a caller pass labels as keywords in one call
(`requests.inc(model=m, outcome="success")`) and read a value back for tests and tools;
`prometheus_client` stores, locks (worker threads observe durations while the event loop counts
requests) and writes the text exposition (0.0.4). The registry is the app's own, never the
process-global one, so two apps in one process (tests, Ray Serve replicas) count apart.

The server's set mirrors Triton's (`nv_inference_*`): requests by outcome, inference count vs
execution count (so batching efficiency shows), pending requests, queue / decode / compute /
total durations, plus bytes received and the (channels, bits) mix of the frames.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
# No `*_created` series beside every counter and histogram: the exposition keeps the names it
# always had, and a scrape stays small. A process-wide switch of prometheus_client, set here.
prometheus_client.disable_created_metrics()
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_M = TypeVar("_M", prometheus_client.Counter, prometheus_client.Gauge, prometheus_client.Histogram)


class _Family(Generic[_M]):
    """One `prometheus_client` metric; its labelled children are cached by label values."""

    def __init__(self, metric: _M, name: str, labelnames: Sequence[str]) -> None:
        self.metric: _M = metric
        self.name = name
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _M] = {}

    def _key(self, labels: dict[str, object]) -> tuple[str, ...]:
        try:
            if len(labels) == len(self.labelnames):
                return tuple([str(labels[n]) for n in self.labelnames])
        except KeyError:
            pass
        raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")

    def child(self, labels: dict[str, object]) -> _M:
        """The series for `labels`, which name every label of the metric and no other."""
        key = self._key(labels)
        child = self._children.get(key)
        if child is None:
            child = self.metric.labels(*key) if key else self.metric
            self._children[key] = child
        return child

    def _samples(self, suffix: str, labels: dict[str, object]) -> dict[str, float]:
        """The values of sample `name + suffix` whose labels include `labels`, by `le` label."""
        want = {k: str(v) for k, v in labels.items()}
        return {
            s.labels.get("le", ""): s.value
            for family in self.metric.collect()
            for s in family.samples
            if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in want.items())
        }


class Counter(_Family[prometheus_client.Counter]):
    """A monotonically increasing count per label set."""

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry
    ) -> None:
        counter = prometheus_client.Counter(name, help, labelnames, registry=registry)
        super().__init__(counter, name, labelnames)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self.child(labels).inc(amount)

    def value(self, **labels: object) -> float:
        """The count for `labels` (0 for a series never counted), for tests and tools."""
        self._key(labels)  # checks the label names
        return sum(self._samples("_total", labels).values())


class Gauge(_Family[prometheus_client.Gauge]):
    """A value that goes up and down, set directly or read from a callback at scrape time."""

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry
    ) -> None:
        gauge = prometheus_client.Gauge(name, help, labelnames, registry=registry)
        super().__init__(gauge, name, labelnames)

    def set(self, value: float, **labels: object) -> None:
        self.child(labels).set(value)

    def set_function(self, fn: Callable[[], float], **labels: object) -> None:
        def read() -> float:
            try:
                return float(fn())
            except Exception:  # a broken callback must not break the scrape
                return math.nan

        self.child(labels).set_function(read)


class Histogram(_Family[prometheus_client.Histogram]):
    """Observations counted into cumulative buckets, with their sum and count."""

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = DURATION_BUCKETS,
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.buckets = tuple(sorted(float(b) for b in buckets))
        histogram = prometheus_client.Histogram(
            name, help, labelnames, buckets=self.buckets, registry=registry
        )
        super().__init__(histogram, name, labelnames)

    def observe(self, value: float, **labels: object) -> None:
        self.child(labels).observe(value)

    def counts(self, **labels: object) -> dict[float, int]:
        """Non-cumulative count per bucket upper bound (+Inf last), for tests and tools."""
        self._key(labels)  # checks the label names
        cumulative = {float(le): int(n) for le, n in self._samples("_bucket", labels).items()}
        bounds = (*self.buckets, math.inf)
        running = [cumulative.get(b, 0) for b in bounds]
        return {
            b: n - below for b, n, below in zip(bounds, running, [0, *running[:-1]], strict=True)
        }


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
        self.registry = r = CollectorRegistry()
        m, o = ("model",), ("model", "outcome")
        self.http_requests = Counter(
            "splitexit_http_requests_total", "HTTP requests by route, method and status code",
            ("route", "method", "code"), registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "splitexit_inference_requests_total",
            "inference requests by model and outcome (success, bad_request, fingerprint_mismatch, "
            "too_large, overloaded, not_ready, timeout, client_timeout, unauthorized, "
            "client_disconnect, error)", o, registry=r,
        )  # fmt: skip
        self.inference_count = Counter(
            "splitexit_inference_count_total", "samples inferred (a batch of n counts n)", m,
            registry=r,
        )  # fmt: skip
        self.execution_count = Counter(
            "splitexit_inference_exec_count_total", "tail executions (one per batch)", m, registry=r
        )  # fmt: skip
        self.batch_size = Histogram(
            "splitexit_batch_size", "samples per tail execution", m, BATCH_BUCKETS, registry=r
        )  # fmt: skip
        self.pending = Gauge(
            "splitexit_pending_requests", "inference requests queued or running", m, registry=r
        )  # fmt: skip

        def duration(what: str, help: str) -> Histogram:  # splitexit_<what>_duration_seconds
            return Histogram(f"splitexit_{what}_duration_seconds", help, m, registry=r)

        self.queue_duration = duration("queue", "time a request waited for its batch")
        self.decode_duration = duration("decode", "frame / image decoding time per batch")
        self.compute_duration = duration("compute", "model time per batch (head for images, tail)")
        self.request_duration = duration("request", "inference request time, body read to answer")
        self.received_bytes = Counter(
            "splitexit_received_bytes_total", "request body bytes received by model", m, registry=r
        )  # fmt: skip
        self.frame_bytes = Counter(
            "splitexit_frame_bytes_total", "frame bytes received by model", m, registry=r
        )  # fmt: skip
        self.frames = Counter(
            "splitexit_frames_total", "frames by operating point (channels sent, bits)",
            ("model", "channels", "bits"), registry=r,
        )  # fmt: skip
        self.model_ready = Gauge(
            "splitexit_model_ready", "1 when the model is loaded and warmed up", m, registry=r
        )  # fmt: skip
        self.rss = Gauge("process_resident_memory_bytes", "resident memory in bytes", registry=r)
        self.rss.set_function(_rss_bytes)
        self.start_time = Gauge(
            "process_start_time_seconds", "start time, unix seconds", registry=r
        )  # fmt: skip
        self.start_time.set(time.time())

    def header_timed_out(self) -> None:
        """Count a 408 for a header that never completed: no route, no method known yet."""
        self.http_requests.inc(route="unmatched", method="OTHER", code=408)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
