"""Admission control: admit only what can be answered in time, refuse the rest at once.

    request ─ at the door (`AdmissionDoor`: the HTTP protocol writes its 429 itself, before
            │ any ASGI task, routing, auth, logging or body parsing, so that a refusal costs
            │ the server as little as it can; `splitexit_server.connection`):
            │   queue full (max_queue_size), or predicted wait > queue_delay_target? ─ 429
            ├ body parsed: its own deadline (the `timeout` parameter a device sends) shorter
            │   than the predicted wait + one batch? ── 429 (504 if not even one batch fits)
            └ its batch starts: it waited longer than queue_delay_target? ─ 429, not computed
              (CoDel's sojourn rule: an answer that late is of no use to a device; computing it
              would only make everyone behind it late too)

The predicted wait is the longer of two: the full batches of the requests in flight ahead
and the running one, times the measured batch time (the model's share); and the requests in
flight divided by the measured answer rate (Little's law: this counts the event loop's time
for each request too, its HTTP and its answer, which under overload is most of it). Both
measurements are exponentially weighted means, so the prediction follows the model, the
batch size and the machine without configuration. The answer rate is measured only over
windows in which the server was never idle (an idle server shows its load, not its rate);
it never keeps out half a batch, so that a rate measured in a bad moment cannot keep the
door shut.
(A concurrency limit adapted from the answers' times, TCP-style, was tried and dropped:
under overload the answers' time was mostly the event loop's, spent on the refusals
themselves, so the limit fell to 1 and goodput with it; see benchmarks/overload.py.)

Every refusal is `Overloaded` (429 + Retry-After), which a device reads as "answer locally
now". Refusals at the door are counted (`splitexit_inference_requests_total{outcome=
"overloaded"}`) but, unlike every other answer, not written to the access log: under overload
that log line would cost more than the refusal. Their bytes are built once per message.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import TYPE_CHECKING, Any

from splitexit_server.errors import DeadlineExceeded, Overloaded, ServerError, with_retry_after
from splitexit_server.limits import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from splitexit_server.state import ServerState

_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer")
RATE_WINDOW_S = 0.1  # the answer rate is measured over busy windows this long
_CACHED = 512  # refusal responses (the message names a number) and paths kept


class Admission:
    """What one model admits: from its batch time, its answer rate and its requests in flight.

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
        self.answer_rate = 0.0  # requests answered per second while busy, 0 until measured
        self.inflight = 0  # requests past the door, not yet answered (`enter`, `leave`)
        self._window: float | None = None  # when the current busy window began
        self._answered = 0  # requests answered in it

    # ------------------------------------------------------------------ measurements

    def record_batch(self, seconds: float) -> None:
        """Note how long a batch took (exponentially weighted mean)."""
        if math.isfinite(seconds) and seconds >= 0:
            self.batch_s += (0.2 if self.batch_s else 1.0) * (seconds - self.batch_s)

    def enter(self) -> None:
        """A request passed the door."""
        if self._window is None:
            self._window, self._answered = time.perf_counter(), 0
        self.inflight += 1

    def leave(self) -> None:
        """A request that passed the door is answered (or refused after it). Each window of
        `RATE_WINDOW_S` in which the server was never idle gives an answer rate."""
        self.inflight -= 1
        self._answered += 1
        if self._window is None:
            return
        if self.inflight == 0:  # idle: this window says nothing about the rate
            self._window = None
            return
        now = time.perf_counter()
        if now - self._window >= RATE_WINDOW_S:
            rate = self._answered / (now - self._window)
            self.answer_rate += (0.3 if self.answer_rate else 1.0) * (rate - self.answer_rate)
            self._window, self._answered = now, 0

    def expected_wait(self, ahead: int, running: bool) -> float:
        """Seconds a request arriving now waits: for its batch (the full batches of the
        `ahead` requests before it, and the one running, shared among the workers), or, when
        longer, for the requests in flight to be answered at the measured answer rate (half
        a batch is always let in: a rate measured low cannot shut the door on everything)."""
        batches = ahead // self.max_batch_size + (1 if running else 0)
        wait = batches * self.batch_s / self.workers
        if self.answer_rate and self.inflight >= self.max_batch_size // 2:
            wait = max(wait, self.inflight / self.answer_rate)
        return wait

    # -------------------------------------------------------------------- decisions

    def at_door(self, model: str, running: bool) -> ServerError | None:
        """The 429 for a request that would wait past the target (counting the requests in
        flight ahead of it), else None."""
        wait = self.expected_wait(self.inflight, running)
        if wait <= self.target_s:
            return None
        return self.too_long(model, wait)

    def too_long(self, model: str, wait_s: float) -> ServerError:
        """The 429 for a request predicted to wait `wait_s`, past the target."""
        return self._refuse(
            f"model {model!r} is overloaded: a request now would wait about "
            f"{wait_s * 1e3:.0f} ms for its batch, over the {self.target_s * 1e3:g} ms target "
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
    its model's queue is full or its wait would pass the target; count the ones let in.

    `refusal(path)` gives the same refusal as bytes, for the HTTP protocol to write before
    any ASGI task exists (`splitexit_server.connection.guarded_protocol`)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self._models: dict[str, str | None] = {}  # path -> model name (None: not an infer)
        self._responses: dict[tuple[str, str | int], bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = self._model(scope.get("path", "")) if scope.get("method") == "POST" else None
        if scope["type"] != "http" or model is None:
            await self.app(scope, receive, send)
            return
        refused = self._check(model)
        if refused is not None:
            self.state.metrics.requests.inc(model=model.name, outcome=refused.outcome)
            await _answer(send, scope, refused)
            return
        model.admission.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            model.admission.leave()

    def refusal(self, path: str) -> bytes | None:
        """The whole HTTP/1.1 429 response (keep-alive) if the door refuses a POST to `path`
        now, else None. The common refusal (the predicted wait) costs no new object."""
        model = self._model(path)
        if model is None:
            return None
        adm, b = model.admission, model.batcher
        error: ServerError | None = None
        if b.queued >= self.state.settings.max_queue_size:
            error = self._check(model)  # the queue is full
            assert error is not None
            key: str | int = error.message
        else:
            wait = adm.expected_wait(adm.inflight, b.pending > b.queued)
            if wait <= adm.target_s:
                return None
            key = round(wait * 1e3)
        self.state.metrics.requests.inc(model=model.name, outcome=Overloaded.outcome)
        cached = self._responses.get((model.name, key))
        if cached is None:
            if len(self._responses) >= _CACHED:
                self._responses.clear()
            status, headers, body = _response(None, error or adm.too_long(model.name, wait))
            lines = [f"HTTP/1.1 {status} Too Many Requests".encode()]
            lines += [k + b": " + v for k, v in headers]
            cached = b"\r\n".join(lines) + b"\r\n\r\n" + body
            self._responses[(model.name, key)] = cached
        return cached

    def _model(self, path: str) -> Any:
        """The served model an inference POST to `path` is for, when it is ready to serve;
        else None (the app answers: 404, 503, ...)."""
        name = self._models.get(path, "")
        if name == "":
            if len(self._models) >= _CACHED:
                self._models.clear()
            match = _INFER.fullmatch(path)
            name = self._models[path] = match.group(1) if match else None
        model = self.state.models.get(name) if name is not None else None
        if model is None or not model.ready or self.state.draining:
            return None
        return model

    def _check(self, model: Any) -> ServerError | None:
        b, limit = model.batcher, self.state.settings.max_queue_size
        if b.queued >= limit:
            full = Overloaded(
                f"model {model.name!r} has {b.queued} requests queued (max_queue_size={limit}); "
                "retry later"
            )
            return with_retry_after(full, model.admission.retry_after_s)
        return model.admission.at_door(model.name, b.pending > b.queued)


def _response(
    scope: Scope | None, error: ServerError
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a refusal; `Connection: close` when the request (`scope`;
    None: its body is read already) has a body too big to read and drop."""
    from splitexit_server.connection import close_unread

    body = json.dumps({"error": error.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
    ]
    if scope is not None and close_unread(scope, 0):
        headers.append((b"connection", b"close"))
    return error.status, headers, body


async def _answer(send: Send, scope: Scope, error: ServerError) -> None:
    status, headers, body = _response(scope, error)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
