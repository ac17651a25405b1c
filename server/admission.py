"""Admission control: admit only what can be answered in time, refuse the rest at once.

    request ─ at the door (`AdmissionDoor`, the outermost ASGI layer: before routing, auth,
            │ logging or the body, so that a refusal costs the server as little as it can):
            │   queue full (max_queue_size)? in flight >= the concurrency limit? predicted
            │   wait (batches ahead x measured batch time) > queue_delay_target? ──────── 429
            ├ body parsed: its own deadline (the `timeout` parameter a device sends) shorter
            │   than the predicted wait + one batch? ── 429 (504 if not even one batch fits)
            └ its batch starts: it waited longer than queue_delay_target? ─ 429, not computed
              (CoDel's sojourn rule: an answer that late is of no use to a device; computing it
              would only make everyone behind it late too)

The concurrency limit bounds the requests in flight past the door, wherever they wait (the
batch queue, or the event loop reading and answering them: under overload that is where
most of the time goes). It adapts like TCP's window, from the answers' own times: an answer
within the base time (the fastest recent answer) + the target raises it by 1/limit; a later
one cuts it by 10%, at most once per base time. By Little's law the answers' time then stays
near base + target, while the limit stays as high as the server can keep on time.

Every refusal is `Overloaded` (429 + Retry-After), which a device reads as "answer locally
now". Refusals at the door are counted (`splitexit_inference_requests_total{outcome=
"overloaded"}`) but, unlike every other answer, not written to the access log: under overload
that log line would cost more than the refusal.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import TYPE_CHECKING, Any

from server.errors import DeadlineExceeded, Overloaded, ServerError, with_retry_after
from server.limits import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from server.state import ServerState

_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer")
_BASE_WINDOW_S = 10.0  # the base time is the fastest answer of the last one or two windows


class Admission:
    """What one model admits: its batch time, its requests in flight, its concurrency limit.

    Args:
        target_s: the longest a request should wait (queue_delay_target_ms).
        max_batch_size: samples per batch (the queue drains this many per batch).
        workers: batches run at once.
        retry_after_s: the `Retry-After` of a refusal.
        max_limit: the highest concurrency limit (the queue's size plus the running batches).
    """

    def __init__(
        self,
        target_s: float,
        max_batch_size: int,
        workers: int = 1,
        retry_after_s: int = 1,
        max_limit: int = 256,
    ) -> None:
        self.target_s = target_s
        self.max_batch_size = max_batch_size
        self.workers = workers
        self.retry_after_s = retry_after_s
        self.max_limit = max(1, max_limit)
        self.batch_s = 0.0  # mean seconds per batch (decode + model), 0 until one ran
        self.inflight = 0  # requests past the door, not yet answered
        self.limit = float(self.max_limit)  # wide open until answers come late
        self.base_s = math.inf  # the fastest recent answer
        self._window_min = math.inf
        self._window_end = 0.0
        self._last_cut = 0.0

    # ------------------------------------------------------------------ measurements

    def record_batch(self, seconds: float) -> None:
        """Note how long a batch took (exponentially weighted mean)."""
        if math.isfinite(seconds) and seconds >= 0:
            self.batch_s += (0.2 if self.batch_s else 1.0) * (seconds - self.batch_s)

    def record_answer(self, seconds: float, now: float | None = None) -> None:
        """Note an answer's time from the door to its last byte; adapt the limit."""
        now = time.monotonic() if now is None else now
        if now >= self._window_end:  # a new window: the base forgets all but the last one
            self.base_s, self._window_min = self._window_min, math.inf
            self._window_end = now + _BASE_WINDOW_S
        self._window_min = min(self._window_min, seconds)
        base = min(self.base_s, self._window_min)
        if seconds <= base + self.target_s:
            self.limit = min(self.max_limit, self.limit + 1.0 / self.limit)
        elif now - self._last_cut >= base:
            self.limit = max(1.0, self.limit * 0.9)
            self._last_cut = now

    def expected_wait(self, ahead: int, running: bool) -> float:
        """Seconds a request arriving now waits for its batch: the full batches of the
        `ahead` requests before it, and the one running, shared among the workers."""
        batches = ahead // self.max_batch_size + (1 if running else 0)
        return batches * self.batch_s / self.workers

    # -------------------------------------------------------------------- decisions

    def at_door(self, model: str, running: bool) -> ServerError | None:
        """The 429 for a request that would exceed the concurrency limit or wait past the
        target, else None."""
        if self.inflight >= self.limit:
            return self._refuse(
                f"model {model!r} is overloaded: {self.inflight} requests in flight, as many as "
                f"it answers within the {self.target_s * 1e3:g} ms target (queue_delay_target_ms) "
                "now; answer locally or retry later"
            )
        wait = self.expected_wait(self.inflight, running)
        if wait <= self.target_s:
            return None
        return self._refuse(
            f"model {model!r} is overloaded: a request now would wait about {wait * 1e3:.0f} ms "
            f"for its batch, over the {self.target_s * 1e3:g} ms target "
            "(queue_delay_target_ms); answer locally or retry later"
        )

    def within(self, model: str, ahead: int, running: bool, left_s: float) -> ServerError | None:
        """For a request whose own deadline is `left_s` from now: 504 if not even one batch
        fits before it, 429 if the predicted wait plus one batch does not, else None."""
        need = self.expected_wait(ahead, running) + self.batch_s
        if need <= left_s:
            return None
        if left_s < self.batch_s:
            return DeadlineExceeded(
                f"the request's timeout ({max(left_s, 0) * 1e3:.3g} ms) is shorter than one "
                f"batch of model {model!r} ({self.batch_s * 1e3:.3g} ms): its deadline would "
                "pass before an answer; not computed"
            )
        return self._refuse(
            f"model {model!r} cannot answer within the request's timeout ({left_s * 1e3:.0f} ms"
            f"; about {need * 1e3:.0f} ms now): answer locally"
        )

    def late(self, model: str, waited_s: float) -> ServerError:
        """The 429 for a request that waited past the target and is dropped uncomputed."""
        return self._refuse(
            f"model {model!r} is overloaded: the request waited {waited_s * 1e3:.0f} ms for its "
            f"batch, over the {self.target_s * 1e3:g} ms target (queue_delay_target_ms), and "
            "was dropped uncomputed; answer locally or retry later"
        )

    def _refuse(self, message: str) -> ServerError:
        return with_retry_after(Overloaded(message), self.retry_after_s)


class AdmissionDoor:
    """ASGI middleware: refuse an inference request with 429 before anything else runs, when
    its model's queue is full, its concurrency limit reached, or its wait would pass the
    target; time the answers of the requests it lets in."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused, model = self._check(scope)
        if refused is not None:
            self.state.metrics.requests.inc(model=model.name, outcome=refused.outcome)
            await _answer(send, scope, refused)
            return
        if model is None:
            await self.app(scope, receive, send)
            return
        adm: Admission = model.admission
        start = time.monotonic()
        status = 0

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if status == 200 and not message.get("more_body", True):
                adm.record_answer(time.monotonic() - start)

        adm.inflight += 1
        try:
            await self.app(scope, receive, timed_send)
        finally:
            adm.inflight -= 1

    def _check(self, scope: Scope) -> tuple[ServerError | None, Any]:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return None, None
        match = _INFER.fullmatch(scope.get("path", ""))
        model = self.state.models.get(match.group(1)) if match else None
        if model is None or not model.ready or self.state.draining:
            return None, None  # the app answers (404, 503, ...)
        b, limit = model.batcher, self.state.settings.max_queue_size
        if b.queued >= limit:
            full = Overloaded(
                f"model {model.name!r} has {b.queued} requests queued (max_queue_size={limit}); "
                "retry later"
            )
            return with_retry_after(full, model.admission.retry_after_s), model
        return model.admission.at_door(model.name, b.pending > b.queued), model


async def _answer(send: Send, scope: Scope, error: ServerError) -> None:
    from server.connection import close_unread

    body = json.dumps({"error": error.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
    ]
    if close_unread(scope, 0):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
