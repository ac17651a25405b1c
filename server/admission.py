"""Admission control: admit only what can be answered in time, refuse the rest at once.

    request ─ at the door (`AdmissionDoor`, the outermost ASGI layer: before routing, auth,
            │ logging or the body, so that a refusal costs the server as little as it can):
            │   queue full (max_queue_size), or predicted wait (the full batches of the
            │   requests in flight ahead x the measured batch time) > queue_delay_target? ─ 429
            ├ body parsed: its own deadline (the `timeout` parameter a device sends) shorter
            │   than the predicted wait + one batch? ── 429 (504 if not even one batch fits)
            └ its batch starts: it waited longer than queue_delay_target? ─ 429, not computed
              (CoDel's sojourn rule: an answer that late is of no use to a device; computing it
              would only make everyone behind it late too)

The batch time is an exponentially weighted mean of the measured batches, so the prediction
follows the model, the batch size and the machine without configuration. (A concurrency
limit adapted from the answers' times, TCP-style, was tried and dropped: under overload the
answers' time is mostly the event loop's, spent on the refusals themselves, so the limit fell
to 1 and goodput with it; see benchmarks/overload.py.)

Every refusal is `Overloaded` (429 + Retry-After), which a device reads as "answer locally
now". Refusals at the door are counted (`splitexit_inference_requests_total{outcome=
"overloaded"}`) but, unlike every other answer, not written to the access log: under overload
that log line would cost more than the refusal.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from splitexit_server.errors import DeadlineExceeded, Overloaded, ServerError, with_retry_after
from splitexit_server.limits import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from splitexit_server.state import ServerState

_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer")


class Admission:
    """What one model admits: from its batch time and its requests in flight.

    Args:
        target_s: the longest a request should wait (queue_delay_target_ms).
        max_batch_size: samples per batch (the queue drains this many per batch).
        workers: batches run at once.
        retry_after_s: the `Retry-After` of a refusal.
    """

    def __init__(
        self,
        target_s: float,
        max_batch_size: int,
        workers: int = 1,
        retry_after_s: int = 1,
    ) -> None:
        self.target_s = target_s
        self.max_batch_size = max_batch_size
        self.workers = workers
        self.retry_after_s = retry_after_s
        self.batch_s = 0.0  # mean seconds per batch (decode + model), 0 until one ran
        self.inflight = 0  # requests past the door, not yet answered

    # ------------------------------------------------------------------ measurements

    def record_batch(self, seconds: float) -> None:
        """Note how long a batch took (exponentially weighted mean)."""
        if math.isfinite(seconds) and seconds >= 0:
            self.batch_s += (0.2 if self.batch_s else 1.0) * (seconds - self.batch_s)

    def expected_wait(self, ahead: int, running: bool) -> float:
        """Seconds a request arriving now waits for its batch: the full batches of the
        `ahead` requests before it, and the one running, shared among the workers."""
        batches = ahead // self.max_batch_size + (1 if running else 0)
        return batches * self.batch_s / self.workers

    # -------------------------------------------------------------------- decisions

    def at_door(self, model: str, running: bool) -> ServerError | None:
        """The 429 for a request that would wait past the target (counting the requests in
        flight ahead of it), else None."""
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
    its model's queue is full or its wait would pass the target; count the ones let in."""

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
        model.admission.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            model.admission.inflight -= 1

    def refusal(self, scope: Scope) -> bytes | None:
        """The whole HTTP/1.1 429 response for this request if the door refuses it, else None:
        for the HTTP protocol to write itself, before any ASGI task exists
        (`splitexit_server.connection`)."""
        refused, model = self._check(scope)
        if refused is None:
            return None
        self.state.metrics.requests.inc(model=model.name, outcome=refused.outcome)
        status, headers, body = _response(scope, refused)
        lines = [f"HTTP/1.1 {status} Too Many Requests".encode()]
        lines += [k + b": " + v for k, v in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

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


def _response(scope: Scope, error: ServerError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    from splitexit_server.connection import close_unread

    body = json.dumps({"error": error.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
    ]
    if close_unread(scope, 0):
        headers.append((b"connection", b"close"))
    return error.status, headers, body


async def _answer(send: Send, scope: Scope, error: ServerError) -> None:
    status, headers, body = _response(scope, error)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
