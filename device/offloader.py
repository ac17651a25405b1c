"""The agent's side of the network: the client, the circuit breaker, and what requests teach.

    agent ─ blocked()? ─ yes (stopped, circuit open, server said wait) ─► answer locally
            └─ no ─ send(frame) ─ client.infer ─┬─ answer ─► breaker closes, link estimate
                                                └─ error ──► breaker / hold / stop offloading,
                                                             link estimate (deadline misses)
    probe_loop: small and large probes keep the link estimate current

Every request is also a sample for `Measurements`: bytes both ways, when it went out (after
the wait behind the requests ahead of it), when its answer came.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from .breaker import CircuitBreaker
from .client import InferResult, OffloadClient, OffloadError, OffloadTimeout, ServerBusy
from .estimator import Measurements

_PROBE_BYTES = {False: 350.0, True: 1500.0}  # small / large probe, both ways (a prior)


class Offloader:
    """Sends frames through `client`, keeping `breaker` and `measure` up to date.

    `disabled` names why offloading stopped for good (a 409, 401/403/404), or is None.
    `log` gets one line per event a person should know about.
    """

    def __init__(
        self,
        client: OffloadClient,
        measure: Measurements,
        breaker: CircuitBreaker,
        *,
        probe_interval_s: float = 0.5,
        log: Callable[[str], None] = print,
    ) -> None:
        self.client = client
        self.measure = measure
        self.breaker = breaker
        self.probe_interval_s = probe_interval_s
        self.log = log
        self.disabled: str | None = None
        self._inflight = 0  # requests out, inference and probes
        self._last_answer = -math.inf

    async def start(self, fingerprint: str) -> dict[str, Any]:
        """Check the server serves `fingerprint` (FingerprintRejected if not), time the link."""
        meta = await self.client.check_fingerprint(fingerprint)
        for large in (False, True, False):
            await self.probe(large)
        return meta

    @property
    def idle(self) -> bool:
        """No request is out, inference or probe: no answer is waiting to be read."""
        return self._inflight == 0

    def blocked(self) -> str | None:
        """Why no frame may go out now, or None. None may reserve the breaker's one trial:
        send it, or give it back with `release`."""
        if self.disabled is not None:
            return self.disabled
        if not self.breaker.allow():
            return "busy" if self.breaker.held else "circuit_open"
        return None

    def release(self) -> None:
        """A frame `blocked` let through will not be sent after all."""
        self.breaker.release()

    async def send(
        self, frame: bytes, request_id: str, deadline: float | None, *, image: bool = False
    ) -> InferResult:
        """Offload one frame, or an encoded image (see `OffloadClient.infer`); raises
        OffloadError after noting it."""
        expected = len(frame) + self.measure.overhead_bytes.value
        sent = time.monotonic()
        wait = self._sending(expected, sent)
        name = "image" if image else "frame"
        try:
            res = await self.client.infer(frame, request_id, deadline=deadline, input_name=name)
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except OffloadError as e:
            self._failed(e, sent + wait, expected)
            raise
        finally:
            self._answered()
        self.breaker.success()
        self._last_answer = time.monotonic()
        if res.attempts == 1:
            done = res.sent_at + res.seconds
            self.measure.observe_answer(
                frame_bytes=len(frame),
                request_bytes=res.request_bytes,
                response_bytes=res.response_bytes,
                sent=self._started(res.sent_at, wait, done),
                done=done,
                server_s=res.server_s,
                image=image,
            )
        return res

    def _failed(self, e: OffloadError, sent: float, nbytes: float) -> None:
        if e.fatal:
            if self.disabled is None:
                self.disabled = e.reason
                self.log(f"offloading stopped for this run: {e}")
            return
        if isinstance(e, ServerBusy):
            self.breaker.hold(e.retry_after_s)
            return
        if e.reason == "rejected":
            self.log(f"the server refused a frame: {e}")
            return
        if isinstance(e, OffloadTimeout) and e.attempts == 1 and e.request_bytes:
            # a lower bound on this request's time: tells the estimate the link got slow
            self.measure.link.observe_late(sent, time.monotonic(), nbytes)
        if not (isinstance(e, OffloadTimeout) and e.by_deadline):
            self.breaker.failure()  # a slow link missing a deadline is no sign of a dead server

    # --------------------------------------------------------------------------- probes

    async def probe_loop(self) -> None:
        """Time the link with small requests next to the inference requests (runs until
        cancelled).

        Small and large probes in turn let the estimator tell bandwidth from round-trip
        time without the server's compute in the way. They go out every interval while no
        answers come in (so the agent sees when offloading pays again) or while the link
        estimate is relearning after a change, and every few intervals otherwise.
        """
        interval = self.probe_interval_s
        large = False
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if self.disabled is not None or self.breaker.state != "closed":
                continue
            idle = now - self._last_answer >= interval
            stale = now - self.measure.link.bandwidth_seen_at >= 4 * interval
            if idle or stale or self.measure.link.relearning:
                await self.probe(large)
                large = not large

    async def probe(self, large: bool = False) -> None:
        """One probe, timed, for the link estimate (failures are ignored)."""
        wait = self._sending(_PROBE_BYTES[large], time.monotonic())
        try:
            ex = await self.client.probe(large)
        except OffloadError:
            return
        finally:
            self._answered()
        done = ex.sent_at + ex.seconds
        start = self._started(ex.sent_at, wait, done)
        self.measure.link.observe(start, done, ex.request_bytes + ex.response_bytes)

    def _started(self, sent: float, wait: float, done: float) -> float:
        """When a request got the link: after its predicted wait behind those in flight, but
        never so late that it would look quicker than the quickest lone request (a wait
        over-predicted must not drag the base latency down)."""
        if wait <= 0:
            return sent
        return max(sent, min(sent + wait, done - self.measure.link.base_latency_s))

    def _sending(self, nbytes: float, now: float) -> float:
        """A request goes out: returns how long it should wait behind those in flight."""
        self._inflight += 1
        return self.measure.link.reserve(nbytes, now)

    def _answered(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self.measure.link.clear_queue()

    def snapshot(self) -> dict[str, Any]:
        """For the summary: the link estimate, breaker trips, why offloading stopped."""
        out: dict[str, Any] = {
            "link": self.measure.snapshot(),
            "breaker_opened": self.breaker.opened,
            "transport": getattr(self.client, "transport", "http"),
        }
        if self.disabled is not None:
            out["offloading_stopped"] = self.disabled
        return out
