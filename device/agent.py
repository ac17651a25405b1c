"""The agent loop: every input answered exactly once, locally or by the tail server.

    source ─► [worker thread] load ─ preprocess ─ head (exits) ─┬─ confident exit ─► record
                                                               └─ policy ─┬─ local ─► record
                      [worker thread, or inline if small] encode (k, bits) ◄┘ offload
                                         │
                                         ▼  (at most `window` frames in flight)
                               [event loop] client.infer ─┬─ answer ─► record ("server")
                                                          └─ failed ─► best exit ("fallback")

The head runs in one worker thread, so it computes the next inputs while earlier frames are
on the wire; a small code (up to 4,096 values) is framed on the event loop, where the
thread hop would cost more than the work. A circuit breaker answers locally while the
server is down and lets a trial through now and then, so offloading resumes by itself; a
409 (fingerprint) or 401/403/404 stops offloading for the run. `stop()` (Ctrl-C) stops
taking inputs; frames in flight are answered locally, and the summary still comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from splitexit.bundle import Bundle
from splitexit.errors import BundleError
from splitexit.runtime import HeadResult, HeadRunner

from .breaker import CircuitBreaker
from .client import OffloadClient, OffloadError
from .config import AgentConfig, operating_points
from .estimator import LinkEstimator, Measurements
from .offloader import Offloader
from .policy import AdaptiveRule, Decision, FixedRule, Point, best_point, decide, find_point
from .records import ERROR, FALLBACK, SERVER, Record, RecordWriter, Summary
from .sources import Input, label_index

_RESPONSE_BYTES_GUESS = 350.0
_LOCAL_MARGIN_S = 0.002  # time kept back from a deadline to answer locally
_INLINE_ENCODE_ELEMENTS = 4096  # codes up to this size are framed on the event loop (~0.1 ms)


@dataclass
class _Work:
    """An input between the head and its record."""

    item: Input
    seq: int
    t0: float
    result: HeadResult | None = None
    head_s: float = 0.0
    label: int | None = None


class Agent:
    """Runs a bundle's head over a source and offloads to `client` (None: local only)."""

    def __init__(
        self,
        bundle: Bundle,
        config: AgentConfig | None = None,
        client: OffloadClient | None = None,
        *,
        writer: RecordWriter | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.bundle = bundle
        self.config = config = config or AgentConfig()
        self.client = None if config.local_only else client
        if self.client is None and not config.local_only:
            raise ValueError("an Agent needs a client unless config.local_only is set")
        self.head = HeadRunner(bundle, thresholds=config.thresholds, runtime=config.runtime)
        self.class_names = list(bundle.manifest.class_names)
        if self.client is not None and self.client.classes is None:
            self.client.classes = len(self.class_names)  # an answer outside them is garbage
        self.exit_names = bundle.manifest.exit_names
        self.points = operating_points(bundle)
        self.fixed = (
            find_point(self.points, config.channels, config.bits)
            if (config.channels is not None and config.bits is not None)
            else best_point(self.points)
        )
        overhead = _RESPONSE_BYTES_GUESS + (
            self.client.request_overhead() if self.client is not None else 0
        )
        self.measure = Measurements(
            {(p.channels, p.bits): p.frame_bytes for p in self.points},
            overhead_bytes=overhead,
            link=LinkEstimator(),
        )
        self.breaker = CircuitBreaker(
            config.breaker_failures, config.breaker_reset_s, config.breaker_max_reset_s
        )
        self.writer = writer or RecordWriter()
        self.summary = Summary(self.exit_names)
        self.progress = progress
        self.log = log or (lambda msg: print(f"splitexit-device: {msg}", file=sys.stderr))
        self.net = None
        if self.client is not None:
            self.net = Offloader(
                self.client,
                self.measure,
                self.breaker,
                probe_interval_s=config.probe_interval_s,
                log=self.log,
            )
        self._run_id = uuid.uuid4().hex[:12]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="splitexit-head")
        self._stopping = False
        self._done: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._bar: Any = None

    # ----------------------------------------------------------------------------- api

    async def start(self) -> dict[str, Any] | None:
        """Check the server serves this bundle and time the link; returns its metadata.

        Raises FingerprintRejected on a mismatch, another OffloadError if the server cannot
        be asked. Does nothing in local-only mode.
        """
        if self.net is None:
            return None
        return await self.net.start(self.bundle.fingerprint)

    def stop(self) -> None:
        """Stop taking inputs (Ctrl-C); in-flight frames are answered locally. Thread-safe."""
        self._stopping = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing waits
                loop.call_soon_threadsafe(event.set)

    async def run(self, source: Iterable[Input]) -> Summary:
        """Answer every input of `source` once; returns the summary (also on cancellation).

        An Agent runs once: its head thread is shut down at the end.
        """
        loop = self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        window = asyncio.Semaphore(self.config.window)
        tasks: set[asyncio.Task] = set()
        probing = self.net is not None and self.config.probe_interval_s > 0
        probe = loop.create_task(self.net.probe_loop()) if probing else None  # type: ignore[union-attr]
        self._open_progress(getattr(source, "length", None))
        it = iter(source)
        work: _Work | None = None
        seq = 0
        try:
            while not self._stopping:
                item = await loop.run_in_executor(self._pool, _next, it)
                if item is None:
                    break
                work = _Work(item, seq, time.monotonic())
                seq += 1
                record = await loop.run_in_executor(self._pool, self._run_head, work)
                if record is None:
                    record = await self._after_head(work, window, tasks)
                if record is not None:
                    self._emit(record)
                work = None
            if tasks and not self._stopping:  # after stop(), the finally below cancels them
                await asyncio.gather(*tasks)
        finally:
            if probe is not None:
                probe.cancel()
            self._stopping = True
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if work is not None and work.item.id not in self._done:
                self._emit(self._interrupted(work))
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._finish()
        return self.summary

    # ------------------------------------------------------------------------ per input

    def _run_head(self, work: _Work) -> Record | None:
        """Worker thread: load, preprocess, run the head. A record if it is already decided."""
        item = work.item
        work.t0 = time.monotonic()
        try:
            pixels = item.load()
            work.label = label_index(item.label, self.class_names)
            start = time.monotonic()
            x = self.head.preprocess(pixels[None])
            work.result = self.head.run(x)
            work.head_s = time.monotonic() - start
        except Exception as e:  # one bad input must not end the run
            return self._record(work, ERROR, error=f"{type(e).__name__}: {e}")
        answer = work.result.answer(0)
        if answer is None:
            return None
        return self._record(
            work,
            answer.exit_name,
            prediction=answer.prediction,
            confidence=answer.confidence,
            exit=answer.exit_name,
            reason="threshold",
        )

    async def _after_head(
        self, work: _Work, window: asyncio.Semaphore, tasks: set[asyncio.Task]
    ) -> Record | None:
        """Event loop: decide, encode, and hand the frame to a request task (None then)."""
        if self.net is None:
            return self._local(work, FALLBACK, "local_only")
        if self.net.disabled is not None:
            return self._local(work, FALLBACK, self.net.disabled)
        decision = self._decide(work)
        if decision.action == "local":
            return self._local(work, None, "deadline")
        if self._stopping:
            return self._local(work, FALLBACK, "interrupted")
        blocked = self.net.blocked()
        if blocked is not None:
            return self._local(work, FALLBACK, blocked)
        point = decision.point
        assert point is not None and work.result is not None and work.result.z is not None
        start = time.monotonic()
        z = work.result.z
        try:
            if math.prod(z.shape) <= _INLINE_ENCODE_ELEMENTS:  # a thread hop costs more
                frame = self.head.frame(z, point.bits, point.channels)
            else:
                frame = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self.head.frame, z, point.bits, point.channels
                )
        except BaseException:
            self.net.release()
            raise
        encode_s = time.monotonic() - start
        self.measure.observe_frame((point.channels, point.bits), len(frame), encode_s)
        if not await self._acquire(window):
            self.net.release()
            return self._local(work, FALLBACK, "interrupted", encode_s=encode_s)
        late = self._blocked_while_waiting()
        if late is not None:  # an answer that came while this frame waited for the window
            window.release()
            self.net.release()
            return self._local(work, FALLBACK, late, encode_s=encode_s)
        task = asyncio.create_task(self._offload(work, point, frame, encode_s))
        tasks.add(task)
        task.add_done_callback(lambda t: (tasks.discard(t), window.release()))
        return None

    def _blocked_while_waiting(self) -> str | None:
        """Why a frame that already passed `blocked()` must not go out after all, or None."""
        assert self.net is not None
        if self.net.disabled is not None:
            return self.net.disabled
        if self.net.breaker.held:
            return "busy"
        if self.net.breaker.state == "open":
            return "circuit_open"
        return None

    async def _acquire(self, window: asyncio.Semaphore) -> bool:
        """Wait for a free slot in the window; False if stop() came first."""
        assert self._stop_event is not None
        if not window.locked():
            await window.acquire()
            return True
        slot = asyncio.ensure_future(window.acquire())
        stop = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({slot, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not slot.done():
                slot.cancel()
        got = slot.done() and not slot.cancelled()
        if got and self._stopping:
            window.release()
            return False
        return got

    def _decide(self, work: _Work) -> Decision:
        cfg = self.config
        costs = self.measure.costs(time.monotonic())
        points = [
            Point(
                p.channels, p.bits, p.accuracy, self.measure.mean_frame_bytes((p.channels, p.bits))
            )
            for p in self.points
        ]
        if cfg.policy == "fixed":
            return decide(points, costs, FixedRule(self.fixed.channels, self.fixed.bits))
        left = None
        if cfg.deadline_s is not None:
            left = cfg.deadline_s - (time.monotonic() - work.t0) - _LOCAL_MARGIN_S
        rule = AdaptiveRule(cfg.accuracy_floor, left, local_ok=bool(self.exit_names))
        return decide(points, costs, rule)

    async def _offload(self, work: _Work, point: Point, frame: bytes, encode_s: float) -> None:
        """Request task: one record, whatever happens."""
        assert self.net is not None
        deadline = None
        if self.config.deadline_s is not None:
            deadline = work.t0 + self.config.deadline_s - _LOCAL_MARGIN_S
        common = {"channels": point.channels, "bits": point.bits, "encode_s": encode_s}
        try:
            res = await self.net.send(frame, f"{self._run_id}-{work.seq}", deadline)
        except asyncio.CancelledError:
            self._emit(self._local(work, FALLBACK, "interrupted", **common))
            return
        except OffloadError as e:
            wire = {
                "frame_bytes": e.frame_bytes,
                "overhead_bytes": e.request_bytes - e.frame_bytes,
                "response_bytes": e.response_bytes,
                "attempts": e.attempts,
            }
            self._emit(self._local(work, FALLBACK, e.reason, **common, **wire))
            return
        self._emit(
            self._record(
                work,
                SERVER,
                prediction=res.answer.prediction,
                confidence=res.answer.probability,
                network_s=res.seconds - (res.server_s or 0.0),
                server_s=res.server_s,
                tail_s=res.compute_s,
                frame_bytes=res.frame_bytes,
                overhead_bytes=res.request_bytes - res.frame_bytes,
                response_bytes=res.response_bytes,
                attempts=res.attempts,
                **common,
            )
        )

    # -------------------------------------------------------------------------- records

    def _local(self, work: _Work, decided_by: str | None, reason: str, **kw: Any) -> Record:
        """The best exit's answer; `decided_by` None means that exit's own name."""
        assert work.result is not None
        try:
            answer = self.head.fallback(work.result)[0]
        except BundleError as e:
            return self._record(work, ERROR, reason=reason, error=str(e), **kw)
        return self._record(
            work,
            decided_by or answer.exit_name,
            prediction=answer.prediction,
            confidence=answer.confidence,
            exit=answer.exit_name,
            reason=reason,
            **kw,
        )

    def _interrupted(self, work: _Work) -> Record:
        if work.result is not None:
            return self._local(work, FALLBACK, "interrupted")
        return self._record(work, ERROR, reason="interrupted", error="stopped before the head ran")

    def _record(
        self,
        work: _Work,
        decided_by: str,
        *,
        prediction: int | None = None,
        encode_s: float | None = None,
        network_s: float | None = None,
        server_s: float | None = None,
        tail_s: float | None = None,
        **fields: Any,
    ) -> Record:
        name = None
        if prediction is not None and 0 <= prediction < len(self.class_names):
            name = self.class_names[prediction]
        ms = {
            "head": work.head_s * 1e3 if work.result is not None else None,
            "encode": None if encode_s is None else encode_s * 1e3,
            "network": None if network_s is None else network_s * 1e3,
            "server": None if server_s is None else server_s * 1e3,
            "tail": None if tail_s is None else tail_s * 1e3,
            "total": (time.monotonic() - work.t0) * 1e3,
        }
        source = None if work.item.path is None else str(work.item.path)
        return Record(
            work.item.id,
            decided_by,
            prediction=prediction,
            class_name=name,
            label=work.label,
            timings_ms=ms,
            source=source,
            **fields,
        )

    def _emit(self, record: Record) -> None:
        if record.id in self._done:
            raise RuntimeError(f"input {record.id!r} was answered twice; this is a bug")
        self._done.add(record.id)
        self.writer.write(record)
        self.summary.add(record)
        if self._bar is not None:
            self._bar.update(1)

    # --------------------------------------------------------------------------- helpers

    def _open_progress(self, total: int | None) -> None:
        if not self.progress:
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="input", file=sys.stderr, dynamic_ncols=True)

    def _finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.summary.finish()
        if self.net is not None:
            self.summary.extra.update(self.net.snapshot())


def _next(it: Iterator[Input]) -> Input | None:
    return next(it, None)
