"""The split strategies: the device agent itself over the link, and bare requests without it.

    inputs ─ _ClosedLoop ─► device.Agent (BenchHead, TimedTail, timed image encode)
                 ▲                      │ ─ OffloadClient ─► link
                 └── _Collector (each record) ◄┘

The agent runs unchanged except that its preprocessing, head, tail and image encode are the
timed (and, with `--device-speed`, slowed) versions from `device_side`, so what the agent
measures of itself is the device modelled; split-only's head skips the exit branches. The
agent warms up on the first input before the clock starts counting. Bare requests time
`OffloadClient.infer` alone: the transport, without the agent.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from splitexit.bundle import Bundle
from splitexit.runtime import HeadRunner
from splitexit.runtime.backends import RuntimeOptions
from splitexit_device.agent import Agent
from splitexit_device.client import OffloadClient
from splitexit_device.config import AgentConfig
from splitexit_device.records import Record, RecordWriter
from splitexit_device.sources import Input
from splitexit_device.stream import StreamClient, StreamConfig, bundle_session

from .device_side import BenchHead, DeviceClock, TimedTail, timed_image
from .inputs import Inputs
from .samples import Sample
from .strategies import GAP_S, Strategy


def widest_point(bundle: Bundle) -> tuple[int, int]:
    """(all C channels, most bits): what split-only and split + exit send, the point the
    exit thresholds are calibrated against."""
    b = bundle.manifest.bottleneck
    return b.channels, max(b.bits)


# ------------------------------------------------------------------------ bare requests


@dataclass(frozen=True)
class BareRequests:
    """`OffloadClient.infer` alone, one frame over and over: what the transport costs
    (HTTP, server, link emulator) without the agent around it."""

    mean_ms: float
    request_bytes: float
    response_bytes: float
    count: int
    tail_ms: float | None = None  # the server's mean reported compute, None if not reported


def offload_client(
    url: str, bundle: Bundle, transport: str = "http"
) -> OffloadClient | StreamClient:
    """The agent's client: KServe v2 over HTTP, or the stream (`--transport stream`)."""
    http = OffloadClient(url, bundle.manifest.name)
    if transport == "http":
        return http
    session = bundle_session(bundle, bundle.manifest.name, timing=True)  # the gap's split
    return StreamClient(http, session, StreamConfig(transport="stream"))


async def run_bare_requests(
    bundle: Bundle,
    inputs: Inputs,
    url: str,
    point: tuple[int, int] | None = None,
    n: int = 30,
    transport: str = "http",
) -> BareRequests:
    """Time `n` inference requests of one real frame at `point` (default: the widest),
    closed loop."""
    head = HeadRunner(bundle)
    with torch.inference_mode():
        z = head.run(bundle.preprocess(inputs.pixels[:1]), exits=False).z
    assert z is not None
    channels, bits = point or widest_point(bundle)
    frame = head.frame(z, bits, channels)
    times, computes, up, down = [], [], 0, 0
    async with offload_client(url, bundle, transport) as client:
        await client.check_fingerprint(bundle.fingerprint)
        for i in range(3):
            await client.infer(frame, f"warmup-{i:06d}")
        for i in range(n):
            start = time.perf_counter()
            res = await client.infer(frame, f"bare-{i:06d}")
            times.append((time.perf_counter() - start) * 1e3)
            up += res.request_bytes
            down += res.response_bytes
            if res.compute_s is not None:
                computes.append(res.compute_s * 1e3)
    tail = sum(computes) / len(computes) if len(computes) == n else None
    return BareRequests(sum(times) / n, up / n, down / n, n, tail)


# ------------------------------------------------------------------------------- split


@dataclass(frozen=True)
class AdaptiveSettings:
    """The adaptive policy's goal: a per-input deadline and an accuracy floor (either None)."""

    deadline_s: float | None
    accuracy_floor: float | None = None


def default_floor(bundle: Bundle) -> float | None:
    """The adaptive policy's default accuracy floor: the most accurate operating point's
    accuracy less 1 point (None: not measured)."""
    acc = [p.accuracy for p in bundle.manifest.operating_points if p.accuracy is not None]
    return round(max(acc) - 0.01, 4) if acc else None


class _ClosedLoop:
    """Yields an input `gap_s` after the previous one was answered (waits at most `timeout_s`
    for that answer); see `strategies` for why every strategy has the same gap."""

    def __init__(
        self,
        items: Iterable[Input],
        timeout_s: float,
        gap_s: float = GAP_S,
        on_input: Callable[[], None] = lambda: None,
    ) -> None:
        self._items = items
        self.on_input = on_input
        self._answered = threading.Event()
        self._answered.set()
        self.timeout_s = timeout_s
        self.gap_s = gap_s
        self.timed_out = False

    def __iter__(self) -> Iterator[Input]:
        for item in self._items:
            if not self._answered.wait(self.timeout_s):
                self.timed_out = True
                return
            self._answered.clear()
            time.sleep(self.gap_s)
            self.on_input()
            yield item

    def answered(self) -> None:
        self._answered.set()


class _Collector(RecordWriter):
    """Keeps the agent's records and tells the closed loop each time one is written."""

    def __init__(self, on_record: Callable[[], None]) -> None:
        super().__init__(io.StringIO())
        self.records: list[Record] = []
        self.on_record = on_record

    def write(self, record: Record) -> None:
        self.records.append(record)
        self.on_record()


async def run_split(
    bundle: Bundle,
    inputs: Inputs,
    url: str,
    strategy: Strategy,
    *,
    point: tuple[int, int] | None = None,
    adaptive: AdaptiveSettings,
    speed: float = 1.0,
    timeout_s: float = 600.0,
    log: Callable[[str], None] = print,
    transport: str = "http",
) -> tuple[list[Sample], dict]:
    """Run the device agent over the inputs; returns the samples and the agent's summary.
    The fixed policy sends at `point` (default: the widest)."""
    is_adaptive = strategy.policy == "adaptive"
    channels, bits = point or widest_point(bundle)
    config = AgentConfig(
        policy="adaptive" if is_adaptive else "fixed",
        channels=None if is_adaptive else channels,
        bits=None if is_adaptive else bits,
        deadline_s=adaptive.deadline_s if is_adaptive else None,
        accuracy_floor=adaptive.accuracy_floor if is_adaptive else None,
        tail_here=is_adaptive,  # as `splitexit-device` runs it (unless --no-tail)
        runtime=RuntimeOptions("torch"),  # as BenchHead and local-only: one runtime for all
    )
    clock = DeviceClock(speed)
    items = list(inputs.agent_inputs())
    loop = _ClosedLoop(items, timeout_s=30.0, on_input=clock.begin)  # one entry an input
    collector = _Collector(loop.answered)
    async with offload_client(url, bundle, transport) as client:
        agent = Agent(bundle, config, client, writer=collector, log=log)
        agent.head = BenchHead(bundle, clock, exits=strategy.exits, thresholds=config.thresholds)
        if agent.tail is not None:
            agent.tail = TimedTail(agent.tail, clock)
        agent.encode_image = timed_image(clock, config.image_quality)
        await agent.start()
        await asyncio.get_running_loop().run_in_executor(None, agent.warm_up, items[0])
        clock.entries.clear()  # the warm-up is no input
        try:
            summary = await asyncio.wait_for(agent.run(loop), timeout_s)
        except asyncio.TimeoutError:
            log(f"{strategy.key}: stopped after {timeout_s:.0f} s")
            summary = agent.summary
        info = summary.to_dict()
        info["client_sent_bytes"] = client.sent_bytes
        info["client_received_bytes"] = client.received_bytes
    if loop.timed_out:
        log(f"{strategy.key}: an answer took over {loop.timeout_s:.0f} s; the run was cut short")
    entries = clock.entries
    samples = [
        _sample(r, entries[i] if i < len(entries) else {}) for i, r in enumerate(collector.records)
    ]
    return samples, info


def _sample(r: Record, device_ms: dict[str, float]) -> Sample:
    request = r.frame_bytes + r.overhead_bytes
    return Sample(
        r.id,
        float(r.timings_ms.get("total") or 0.0),
        None if r.label is None else r.prediction == r.label,
        r.decided_by,
        f"{r.channels}x{r.bits}" if r.channels is not None and r.decided_by == "server" else None,
        r.frame_bytes,
        request,
        r.response_bytes,
        r.timings_ms.get("network"),
        device_ms,
        r.timings_ms.get("server"),
        r.timings_ms.get("tail") if r.decided_by == "server" else None,
        r.action,
        r.expected_ms,
    )
