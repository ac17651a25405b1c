"""The agent loop: every input answered exactly once, on the device or by the tail server.

    source ─► [event loop] plan (cost model) ─┬─ image ─► [worker] encode image ─► send ─┐
                                              └─ head ─► [worker thread] load ─ preprocess ─
                  head (exits) ─┬─ confident exit ─► record ("exit")                     │
                                └─ policy ─┬─ local ─► record (best exit, "local")       │
                                           ├─ tail ─► [worker] tail here ─► record       │
      [worker, or loop if small or idle]  encode (k, bits) ◄┘ offload                    │
                                         │                                               │
                                         ▼  (at most `window` requests in flight) ◄──────┘
                               [event loop] client.infer ─┬─ answer ─► record ("server")
                                                          └─ failed ─► best exit ("fallback")

Each decision prices its actions with the one cost model (`splitexit.cost`) built from what
this agent measured (`estimator.Measurements`: its own compute per piece, timed at warm-up
on the first input and then on every input; the link; the server's times, from the warm-up's
frame and image sent once before the first input, then from every answer), and each record
says which action was taken, its expected and its actual time. The head runs in one worker
thread, so it computes the next inputs while earlier requests are on the wire. While nothing
is (no request and no probe out, so no answer would be read late), the head, the encodes and
the tail here run on the event loop instead, where the hop to the thread and back would only
cost (about 1 ms an input with the tail here on the large track's 25 ms model). A small code
(up to 4,096 values) is framed and its tail finished, and a small model input (up to 4,096
values) encoded as an image, on the event loop in any case when quick (under 3 ms): the hop
would cost more than the work. Inputs are taken from the source in the worker thread, unless
the source never waits (`Source.blocking` False: a list, a folder), which is read on the
event loop; while a source that waits is waiting, the event loop plans the next input, and
the input takes that plan if no estimate moved since. A circuit breaker answers locally
while the server is down and lets a trial through now and then, so offloading resumes by
itself; a 409 (fingerprint) or 401/403/404 stops offloading for the run. `stop()` (Ctrl-C)
stops taking inputs; requests in flight are answered locally, and the summary still comes.
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
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from splitexit.bundle import Bundle, OperatingPoint
from splitexit.cost import CostModel
from splitexit.errors import BundleError
from splitexit.preprocess import encode_image
from splitexit.runtime import HeadResult, HeadRunner, TailRunner

from .breaker import CircuitBreaker
from .client import OffloadClient, OffloadError
from .config import AgentConfig, exit_rates, float_accuracy, operating_points
from .estimator import LinkEstimator, Measurements
from .offloader import Offloader
from .policy import (
    AdaptiveRule,
    Choices,
    Decision,
    FixedRule,
    at_bottleneck,
    best_point,
    find_point,
    pareto,
    start,
)
from .records import DEVICE, ERROR, FALLBACK, SERVER, Record, RecordWriter, Summary
from .sources import Input, blocks, label_index

_RESPONSE_BYTES_GUESS = 350.0
_LOCAL_MARGIN_S = 0.002  # time kept back from a deadline to answer locally
_INLINE_ENCODE_ELEMENTS = 4096  # codes up to this size are framed on the event loop
# Device compute expected to take longer than this runs in the worker thread even where a hop
# costs more: while the event loop computes it cannot read answers, so every probe and offload
# in flight would be timed late and the link would read slower than it is.
_INLINE_MAX_S = 0.003
_AHEAD_MAX_S = 0.25  # a plan made while the source waited is used this long after, at most
_TIME_SERVER_S = 2.0  # the longest the server's timing before the first input may take

_T = TypeVar("_T")


@dataclass
class _Work:
    """An input between the head and its record."""

    item: Input
    seq: int
    t0: float
    result: HeadResult | None = None
    head_s: float = 0.0
    preprocess_s: float = 0.0
    label: int | None = None
    cost: CostModel | None = None  # the cost model when the input was taken
    plan: Decision | None = None  # before the head: "image" or "head" (None: no choice)
    exits: frozenset[str] | None = None  # the exits the head runs (None: those that can answer)
    image: bytes | None = None
    image_s: float = 0.0


@dataclass(frozen=True)
class _Plan:
    """What the agent decides before an input's head, and the state it decided in."""

    at: float  # monotonic seconds
    changes: int  # `Measurements.changes` then
    disabled: str | None  # why offloading was off then (None: it was on)
    cost: CostModel
    plan: Decision | None
    exits: frozenset[str] | None


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
        # an exit above threshold 1 never answers: it is not run (`fallback` computes it)
        self._enabled = frozenset(n for n in self.exit_names if self.head.thresholds[n] <= 1.0)
        self.points = operating_points(bundle)
        self.fixed = (
            find_point(self.points, config.channels, config.bits)
            if (config.channels is not None and config.bits is not None)
            else best_point(self.points)
        )
        overhead = _RESPONSE_BYTES_GUESS + (
            self.client.request_overhead() if self.client is not None else 0
        )
        m = bundle.manifest
        self.measure = Measurements(
            {p.key: p.frame_bytes or 0.0 for p in self.points},
            overhead_bytes=overhead,
            link=LinkEstimator(),
            segments=m.segments,
            exit_names=tuple(self.exit_names),
            exit_segments=tuple(e.segment for e in m.exits),
            leave_prior=exit_rates(bundle, self.head.thresholds),
            image_formats=tuple(config.image_formats),
        )
        # code z -> logits on this device (the same runtime as the head), or None
        self.tail = TailRunner(bundle, runtime=config.runtime) if config.tail_here else None
        self.tail_accuracy = float_accuracy(bundle)
        quality = config.image_quality
        self.encode_image: Callable[[Any, str], bytes] = lambda px, fmt: encode_image(
            px, fmt, quality
        )
        self.images = False  # the server takes images and the rule may send them (start())
        self._small_input = math.prod(m.input_shape) <= _INLINE_ENCODE_ELEMENTS
        self._choices_now: Choices | None = None
        self._sizes_now: tuple[float, ...] = ()
        self._frames_at = -1
        self._warm = False
        self._warm_payloads: tuple[bytes, dict[str, bytes]] | None = None  # for `_time_server`
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
        self._taken: dict[str, float] = {}  # action -> when last taken ("head", "exits", "tail")
        self._run_id = uuid.uuid4().hex[:12]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="splitexit-head")
        self._requests: set[asyncio.Task] = set()  # request tasks not yet answered
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
        meta = await self.net.start(self.bundle.fingerprint)
        takes = any(i.get("name") == "image" for i in meta.get("inputs") or ())
        self.images = takes and self.config.images and self.config.policy == "adaptive"
        return meta

    def warm_up(self, item: Input, rounds: int = 5) -> None:
        """Time this device's pieces on `item`: preprocess, head segments, exits, encoding,
        the tail here and the image encode, each the quickest of `rounds` after a first
        round where TorchScript optimises (timing noise only ever adds time). `run` does it
        on its first input unless done already, and then sends what it encoded to the server
        once (`_time_server`)."""
        self._warm = True
        try:
            pixels = item.load()
        except Exception:  # the run will record the error
            return
        never = dict.fromkeys(self.exit_names, 2.0)
        p = self.fixed
        best: dict[str, float] = {}
        frame = b""
        images: dict[str, bytes] = {}

        def timed(key: str, fn: Callable[..., Any], *args: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args)
            best[key] = min(best.get(key, math.inf), time.perf_counter() - t)
            return out

        for r in range(rounds + 1):
            if r == 1:
                best.clear()
            x = timed("preprocess", self.head.preprocess, pixels[None])
            result = self.head.run(x, thresholds=never)
            for key, t in result.timings.items():
                best[key] = min(best.get(key, math.inf), t)
            assert result.z is not None
            frame = timed("encode", self.head.frame, result.z, p.bits, p.channels)
            if self.tail is not None:
                timed("tail", self.tail.run_code, result.z)
            if self.images:
                for fmt in self.config.image_formats:
                    images[fmt] = timed(f"image/{fmt}", self.encode_image, pixels, fmt)
        self._warm_payloads = (frame, images)
        pieces = {k: v for k, v in best.items() if k.startswith(("segment_", "exit_"))}
        self.measure.observe_head(pieces, best["preprocess"])
        self.measure.observe_frame(p.key, len(frame), best["encode"])
        if self.tail is not None:
            self.measure.observe_tail(best["tail"])
        for fmt, data in images.items():
            self.measure.observe_image(fmt, len(data), best[f"image/{fmt}"])

    async def _time_server(self) -> None:
        """Once, before the first input (adaptive policy): the warm-up's frame, and its
        image in each format the policy may send, through the server, so that the server's
        times are measured before they are priced. Unmeasured, they read 0 s, and the first
        input took whichever action that flattered (the image, at any cost) to learn it."""
        payloads, self._warm_payloads = self._warm_payloads, None
        if payloads is None or self.net is None or self.config.policy != "adaptive":
            return
        frame, images = payloads
        sends = [(frame, False), *((data, True) for data in images.values())]
        until = time.monotonic() + _TIME_SERVER_S  # a stalled server holds up no input long
        for k, (payload, image) in enumerate(sends):
            if self._stopping or self.net.blocked() is not None:
                return
            request_id = f"{self._run_id}-warmup-{k}"
            send = asyncio.ensure_future(self.net.send(payload, request_id, until, image=image))
            if not await self._before_stop(send):
                with contextlib.suppress(asyncio.CancelledError):
                    await send  # the offloader gives back what it held
                return
            with contextlib.suppress(OffloadError):  # noted by the offloader like any other
                send.result()

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
        tasks = self._requests
        probing = self.net is not None and self.config.probe_interval_s > 0
        probe = loop.create_task(self.net.probe_loop()) if probing else None  # type: ignore[union-attr]
        self._open_progress(getattr(source, "length", None))
        it = iter(source)
        here = not blocks(source)  # taking an input never waits: no thread hop for it
        work: _Work | None = None
        seq = 0
        try:
            while not self._stopping:
                ahead = None
                if here:
                    item = _next(it)
                else:
                    taking = loop.run_in_executor(self._pool, _next, it)
                    ahead = self._plan_ahead(tasks)  # while the source waits
                    item = await taking
                if item is None:
                    break
                if not self._warm:
                    await loop.run_in_executor(self._pool, self.warm_up, item)
                if self._warm_payloads is not None:
                    await self._time_server()
                work = _Work(item, seq, time.monotonic())
                seq += 1
                self._plan(work, ahead)
                quick = (
                    self._small_input
                    and (not tasks or _is(work.plan, "image"))
                    and self._quick(work)
                )
                record = await self._compute(quick, self._run_head, work)
                self._observe_head(work)
                if record is None:
                    record = await self._after_head(work, window, tasks)
                if record is not None:
                    self._emit(record)
                work = None
                if here:  # a source read here never yields: let the request just handed to
                    await asyncio.sleep(0)  # its task go out, and answers and stop() in
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

    def _plan(self, work: _Work, ahead: _Plan | None = None) -> None:
        """Event loop, before the head: the cost model now, whether to send the image, and
        (adaptive) which exits pay for themselves. `ahead`, made while the source waited
        for this input, is taken if nothing the plan depends on has changed since."""
        disabled = None if self.net is None else self.net.disabled
        p = ahead
        if (
            p is None
            or p.changes != self.measure.changes
            or p.disabled != disabled
            or work.t0 - p.at > _AHEAD_MAX_S
        ):
            p = self._planned(work.t0)
        work.cost, work.plan, work.exits = p.cost, p.plan, p.exits

    def _plan_ahead(self, tasks: set[asyncio.Task]) -> _Plan | None:
        """The next input's plan, made now; None where it would likely be stale by then
        (requests in flight will change the estimates, queued bytes drain as time passes)."""
        now = time.monotonic()
        if tasks or not self._warm or self.measure.link.queue_s(now) > 0:
            return None
        return self._planned(now)

    def _planned(self, t0: float) -> _Plan:
        """`_plan`'s decision for an input taken at `t0`."""
        net = self.net
        disabled = None if net is None else net.disabled

        def plan(decision: Decision | None, exits: frozenset[str] | None) -> _Plan:
            return _Plan(t0, self.measure.changes, disabled, cost, decision, exits)

        cost = self.measure.cost(t0)
        if self.config.policy != "adaptive" or net is None:
            return plan(None, self._enabled)
        if disabled is not None and self.tail is None:
            return plan(None, self._enabled)  # the answer will be the best exit: run them all
        images = self.measure.images() if self.images and disabled is None else {}
        decision = start(self._choices(), cost, self._rule(t0), self.measure.leave_rates(), images)
        if decision.action == "image" and self._stale("head", t0):
            return plan(None, self._enabled)  # run the head once more: its estimate may be stale
        exits = self._enabled
        if decision.exits is not None:
            on = zip(self.exit_names, decision.exits, strict=True)
            exits = frozenset(n for n, run in on if run)
            if exits != self._enabled and self._stale("exits", t0):
                exits = self._enabled
        return plan(decision, exits)

    def _run_head(self, work: _Work) -> Record | None:
        """Worker thread: load, then encode the image (the plan says so) or preprocess and
        run the head. A record if the input is already answered."""
        item = work.item
        try:
            pixels = item.load()
            work.label = label_index(item.label, self.class_names)
            if work.plan is not None and work.plan.image_format is not None:
                start = time.monotonic()
                work.image = self.encode_image(pixels, work.plan.image_format)
                work.image_s = time.monotonic() - start
                return None
            start = time.monotonic()
            x = self.head.preprocess(pixels[None])
            work.preprocess_s = time.monotonic() - start
            exits = self._enabled if work.exits is None else work.exits
            work.result = self.head.run(x, exits=exits)
            work.head_s = time.monotonic() - start
        except Exception as e:  # one bad input must not end the run
            return self._record(work, ERROR, error=f"{type(e).__name__}: {e}")
        answer = work.result.answer(0)
        if answer is None:
            return None
        index = self.exit_names.index(answer.exit_name)
        return self._record(
            work,
            answer.exit_name,
            prediction=answer.prediction,
            confidence=answer.confidence,
            exit=answer.exit_name,
            reason="threshold",
            action="exit",
            expected_s=None if work.cost is None else work.cost.exit_s(index),
        )

    def _quick(self, work: _Work, piece: str = "head") -> bool:
        """The `piece` of this input's device work ("head", which is the image encode when
        the plan sends the image, or "tail") is expected to take no longer than the event
        loop may be kept from reading answers (`_INLINE_MAX_S`)."""
        cost = work.cost
        if cost is None:
            return True
        if piece == "tail":
            expected = cost.tail_here_s()
        elif work.plan is not None and work.plan.image_format is not None:
            expected = self.measure.image_encode_s[work.plan.image_format].value
        else:
            run = self._enabled if work.exits is None else work.exits
            expected = cost.bottleneck_s(tuple(n in run for n in self.exit_names))
        return expected <= _INLINE_MAX_S

    def _observe_head(self, work: _Work) -> None:
        """Event loop: what the head (or the image encode) of this input cost."""
        if work.image is not None and work.plan is not None and work.plan.image_format:
            self.measure.observe_image(work.plan.image_format, len(work.image), work.image_s)
        r = work.result
        if r is None:
            return
        self._taken["head"] = time.monotonic()
        if work.exits == self._enabled:
            self._taken["exits"] = self._taken["head"]
        self.measure.observe_head(r.timings, work.preprocess_s)
        exited, planned = r.exit_name[0], work.exits or frozenset()
        # the exits planned, each run unless the input left before it
        if exited is not None or all(f"exit_{n}" in r.timings for n in planned):
            self.measure.observe_leave(exited, planned)

    async def _after_head(
        self, work: _Work, window: asyncio.Semaphore, tasks: set[asyncio.Task]
    ) -> Record | None:
        """Event loop: decide, encode, and hand the request to a task (None then), or
        answer here."""
        if work.image is not None:
            return await self._send_image(work, window, tasks)
        if self.net is None:
            return self._local(work, FALLBACK, "local_only")
        if self.net.disabled is not None:
            return await self._here(work, self.net.disabled)
        decision = self._decide(work)
        if decision.action == "offload" and self.tail is not None and self._stale("tail"):
            tail_s = work.cost.tail_here_s() if work.cost is not None else None
            decision = Decision("tail", None, tail_s, "explore: not taken for a while")
        expected = self._expected(work, decision)
        if decision.action == "local":
            return self._local(work, None, "deadline", action="local", expected_s=expected)
        if decision.action == "tail":
            return await self._finish_tail(work, decision.reason, expected)
        if self._stopping:
            return self._local(work, FALLBACK, "interrupted")
        blocked = self.net.blocked()
        if blocked is not None:
            return await self._here(work, blocked)
        point = decision.point
        assert point is not None and work.result is not None and work.result.z is not None
        start = time.monotonic()
        z = work.result.z
        try:
            small = math.prod(z.shape) <= _INLINE_ENCODE_ELEMENTS
            frame = await self._compute(small, self.head.frame, z, point.bits, point.channels)
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
        _track(
            asyncio.create_task(self._offload(work, point, frame, encode_s, expected)),
            tasks,
            window,
        )
        return None

    async def _send_image(
        self, work: _Work, window: asyncio.Semaphore, tasks: set[asyncio.Task]
    ) -> Record | None:
        """Event loop: hand the encoded image to a request task (None then); if it cannot
        go out, run the head after all and answer here."""
        assert self.net is not None and work.image is not None and work.plan is not None
        expected = work.plan.expected_s  # planned at t0: from the start
        why = self.net.disabled or ("interrupted" if self._stopping else self.net.blocked())
        if why is None and not await self._acquire(window):
            self.net.release()
            why = "interrupted"
        if why is None:
            why = self._blocked_while_waiting()
            if why is not None:
                window.release()
                self.net.release()
        if why is not None:
            return await self._head_then_here(work, why)
        _track(
            asyncio.create_task(self._offload(work, None, work.image, work.image_s, expected)),
            tasks,
            window,
        )
        return None

    async def _head_then_here(self, work: _Work, reason: str) -> Record:
        """An image that could not be sent: run the head now and answer here."""
        work.image = None
        work.plan = None
        record = await self._compute(False, self._run_head, work)
        self._observe_head(work)
        if record is not None:
            return record
        return await self._here(work, reason)

    async def _here(self, work: _Work, reason: str) -> Record:
        """No request can go out: the tail here if this device has it, else the best exit."""
        if self.tail is None:
            return self._local(work, FALLBACK, reason)
        return await self._finish_tail(work, reason, None)

    async def _finish_tail(self, work: _Work, reason: str, expected_s: float | None) -> Record:
        """Finish the tail on this device (`_compute`)."""
        assert self.tail is not None and work.result is not None and work.result.z is not None
        z = work.result.z
        start = time.monotonic()
        quick = self._quick(work, "tail") and math.prod(z.shape) <= _INLINE_ENCODE_ELEMENTS
        answer = await self._compute(quick, self.tail.run_code, z)
        tail_s = time.monotonic() - start
        self._taken["tail"] = time.monotonic()
        self.measure.observe_tail(tail_s)
        prediction, probability = np.asarray(answer.prediction), np.asarray(answer.probability)
        return self._record(
            work,
            DEVICE,
            prediction=int(prediction[0]),
            confidence=float(probability[0]),
            reason=reason,
            action="tail",
            expected_s=expected_s,
            tail_s=tail_s,
        )

    async def _compute(self, quick: bool, fn: Callable[..., _T], *args: Any) -> _T:
        """Device work `fn(*args)`: on the event loop where it is `quick` or nothing is on
        the wire (`_idle`), else in the worker thread, so answers are read while it runs."""
        if quick or self._idle():
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _idle(self) -> bool:
        """No request task and no probe is out: work on the event loop delays no answer."""
        return not self._requests and (self.net is None or self.net.idle)

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
        got = await self._before_stop(asyncio.ensure_future(window.acquire()))
        if got and self._stopping:
            window.release()
            return False
        return got

    async def _before_stop(self, future: asyncio.Future) -> bool:
        """Wait for `future` or stop(), whichever comes first; False (and `future`
        cancelled) if stop() came first."""
        assert self._stop_event is not None
        stop = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({future, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not future.done():
                future.cancel()
        return future.done() and not future.cancelled()

    def _stale(self, action: str, now: float | None = None) -> bool:
        """The adaptive rule has not taken `action` for `explore_s` (it is due to, once)."""
        every = self.config.explore_s
        if every <= 0 or self.config.policy != "adaptive":
            return False
        now = time.monotonic() if now is None else now
        last = self._taken.setdefault(action, now)  # the warm-up timed it: fresh at start
        return now - last >= every

    def _choices(self) -> Choices:
        """The points with their measured frame sizes (rebuilt when a size moved)."""
        if self._choices_now is not None and self._frames_at == self.measure.frames_seen:
            return self._choices_now  # no frame observed since: no size moved
        self._frames_at = self.measure.frames_seen
        sizes = tuple(round(self.measure.mean_frame_bytes(p.key)) for p in self.points)
        if self._choices_now is None or sizes != self._sizes_now:
            points = [replace(p, frame_bytes=n) for p, n in zip(self.points, sizes, strict=True)]
            if self.config.policy == "adaptive":
                points = pareto(points)
            self._choices_now = Choices(points, self.tail is not None, self.tail_accuracy)
            self._sizes_now = sizes
        return self._choices_now

    def _rule(self, t0: float) -> FixedRule | AdaptiveRule:
        """The rule for an input taken at `t0`: its deadline counts from then."""
        cfg = self.config
        if cfg.policy == "fixed":
            return FixedRule(self.fixed.channels, self.fixed.bits)
        left = None
        if cfg.deadline_s is not None:
            left = cfg.deadline_s - (time.monotonic() - t0) - _LOCAL_MARGIN_S
        return AdaptiveRule(cfg.accuracy_floor, left, local_ok=bool(self.exit_names))

    def _decide(self, work: _Work) -> Decision:
        """At the bottleneck: offload at which point, the tail here, or the best exit now."""
        cost = self.measure.cost(time.monotonic())
        return at_bottleneck(self._choices(), cost, self._rule(work.t0))

    def _expected(self, work: _Work, decision: Decision) -> float | None:
        """The input's expected total seconds, taking `decision` now."""
        if decision.expected_s is None:
            return None
        return time.monotonic() - work.t0 + decision.expected_s

    async def _offload(
        self,
        work: _Work,
        point: OperatingPoint | None,
        payload: bytes,
        encode_s: float,
        expected_s: float | None,
    ) -> None:
        """Request task (a frame at `point`, or the image when None): one record, whatever
        happens."""
        assert self.net is not None
        deadline = None
        if self.config.deadline_s is not None:
            deadline = work.t0 + self.config.deadline_s - _LOCAL_MARGIN_S
        image = point is None
        common: dict[str, Any] = {
            "channels": None if image else point.channels,  # type: ignore[union-attr]
            "bits": None if image else point.bits,  # type: ignore[union-attr]
            "encode_s": encode_s,
            "action": "image" if image else "offload",
            "expected_s": expected_s,
        }
        request_id = f"{self._run_id}-{work.seq}"
        try:
            res = await self.net.send(payload, request_id, deadline, image=image)
        except asyncio.CancelledError:
            if work.result is None:
                self._emit(self._interrupted(work))
            else:
                self._emit(self._local(work, FALLBACK, "interrupted", **common))
            return
        except OffloadError as e:
            wire = {
                "frame_bytes": e.frame_bytes,
                "overhead_bytes": e.request_bytes - e.frame_bytes,
                "response_bytes": e.response_bytes,
                "attempts": e.attempts,
            }
            if work.result is None:  # an image: the head has not run
                record = await self._head_then_here(work, e.reason)
                self._emit(record)
                return
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
                reason=f"image/{work.plan.image_format}" if image and work.plan else None,
                **common,
            )
        )

    # -------------------------------------------------------------------------- records

    def _local(self, work: _Work, decided_by: str | None, reason: str, **kw: Any) -> Record:
        """The best exit's answer; `decided_by` None means that exit's own name."""
        kw.setdefault("action", "local")
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
        expected_s: float | None = None,
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
            expected_ms=None if expected_s is None else expected_s * 1e3,
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


def _track(task: asyncio.Task, tasks: set[asyncio.Task], window: asyncio.Semaphore) -> None:
    """Hold `task` in `tasks` while it runs; when it ends, drop it and free its window slot."""

    def done(t: asyncio.Task) -> None:
        tasks.discard(t)
        window.release()

    tasks.add(task)
    task.add_done_callback(done)


def _is(plan: Decision | None, action: str) -> bool:
    return plan is not None and plan.action == action


def _next(it: Iterator[Input]) -> Input | None:
    return next(it, None)
