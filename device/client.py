"""The offload client: frames to the tail server over HTTP keep-alive, with timeouts and retries.

    infer(frame, request id, deadline)
      └─ attempt ─ POST /v2/models/{model}/infer ─┬─ 200 ─────────────► InferResult
           ▲   (each attempt bounded by            ├─ 429 / 503 / 504 ─► ServerBusy    (answer
           │    min(timeout_s, time left))         │                                  locally now)
           │                                       ├─ 409 ─────────────► FingerprintRejected
           │                                       ├─ 401 / 403 / 404 ─► OffloadRefused (stop)
           │                                       ├─ 400 / 413 ───────► RequestRejected
           └── backoff with full jitter ◄──────────┴─ timeout, connection error, other 5xx,
               while retries and time remain          garbage ─► retry (the request id makes
                                                       a repeat idempotent), else raise

Every request bears the same request id (`X-Request-ID`) on every attempt. Requests are
`httpx.Request`s sent on httpcore's keep-alive pool (`splitexit_device.http`), which retries
nothing: the loop above is the only retry, and the tests exercise each of its paths. (The stream,
`splitexit_device.stream`, is the fast path; this one is for KServe / Triton interop and fallback.)
Bytes are counted as HTTP/1.1 puts them on the wire (request line, headers, body). Requests
carry only the headers that do something: Host, Content-Type, Content-Length,
Inference-Header-Content-Length, X-Request-ID, and Authorization when a token is set; no
Accept, Accept-Encoding, Connection or User-Agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from splitexit.protocol.kserve import (
    CONTENT_TYPE,
    HEADER_LENGTH,
    INPUT_FRAME,
    Answer,
    ProtocolError,
    decode_response,
)
from splitexit.protocol.kserve import encode_request as _encode

from .errors import (
    FingerprintRejected,
    OffloadError,
    OffloadRefused,
    OffloadTimeout,
    RequestRejected,
    ServerBusy,
    ServerFailed,
    ServerUnreachable,
)
from .http import fetch, http_transport, timeouts, within


@dataclass(frozen=True)
class ClientConfig:
    """Timeouts (seconds) and retries of the offload client.

    Args:
        timeout_s: longest one attempt may take, connect to last response byte.
        connect_timeout_s: longest opening a connection may take (within `timeout_s`).
        budget_s: longest one request may take over all its attempts when the input has no
            deadline of its own (with a deadline, the deadline bounds it).
        retries: extra attempts after a timeout, connection error, 5xx or garbage answer.
        backoff_s, backoff_max_s: attempt n waits uniform(0, min(max, base * 2**(n-1))).
        token: bearer token for a server that requires one.
        max_connections: keep-alive connections (at least the agent's in-flight window).
    """

    timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    budget_s: float = 5.0
    retries: int = 2
    backoff_s: float = 0.05
    backoff_max_s: float = 1.0
    token: str | None = None
    max_connections: int = 8

    def __post_init__(self) -> None:
        for name in ("timeout_s", "connect_timeout_s", "budget_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.retries < 0 or self.backoff_s < 0 or self.max_connections < 1:
            raise ValueError("retries and backoff_s must be >= 0, max_connections >= 1")


_RETRYABLE = (OffloadTimeout, ServerUnreachable, ServerFailed)
Send = Callable[[float, float, "Tally"], Awaitable["InferResult"]]


async def with_retries(
    config: ClientConfig, rng: random.Random, deadline: float | None, send: Send
) -> InferResult:
    """One request's attempts, whatever carries them (HTTP, the stream): the diagram above.

    `send(attempt_s, left, tally)` makes one attempt within `attempt_s` (`left`: what is left
    of the deadline, or of `budget_s` without one), counts what it put on the wire into
    `tally`, and returns the result or raises an OffloadError. A timeout, connection loss, 5xx
    or garbage answer is retried after a backoff with full jitter while retries and time
    remain; the error raised carries the attempts and bytes of them all.
    """
    c = config
    end = deadline if deadline is not None else time.monotonic() + c.budget_s
    tally = Tally()
    while True:
        left = end - time.monotonic()
        if left <= 0:
            late = OffloadTimeout("the deadline passed before an answer came")
            late.by_deadline = True
            raise tally.stamp(late)
        tally.attempts += 1
        attempt_s = min(c.timeout_s, left)
        try:
            return await send(attempt_s, left, tally)
        except OffloadError as error:
            if isinstance(error, OffloadTimeout) and attempt_s < c.timeout_s:
                error.by_deadline = True
            if not isinstance(error, _RETRYABLE) or tally.attempts > c.retries:
                raise tally.stamp(error) from None
            last = error
        delay = rng.uniform(0.0, min(c.backoff_max_s, c.backoff_s * 2 ** (tally.attempts - 1)))
        if time.monotonic() + delay >= end:
            raise tally.stamp(last)
        await asyncio.sleep(delay)


# -------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Exchange:
    """One HTTP request/response: bytes each way, seconds, the server's own time if told."""

    request_bytes: int
    response_bytes: int
    sent_at: float  # time.monotonic() when the request went out
    seconds: float
    server_s: float | None
    compute_s: float | None = None  # the server's model compute for it (its batch's)


@dataclass(frozen=True)
class InferResult:
    """An answer and what it cost (bytes summed over attempts; times of the last one)."""

    answer: Answer
    attempts: int
    frame_bytes: int  # frame bytes on the wire: len(frame) x attempts that sent it
    request_bytes: int
    response_bytes: int
    sent_at: float  # time.monotonic() when the last attempt went out
    seconds: float
    server_s: float | None
    compute_s: float | None = None


class OffloadClient:
    """Async client of one model on one tail server. Use as `async with OffloadClient(...)`.

    `classes` (the bundle's class count; the agent sets it from its bundle) makes an answer
    with a class out of range a garbage answer: retried, then the input is answered locally.
    `transport` replaces the default `http.http_transport` (any httpx async transport);
    `rng` makes the backoff jitter reproducible.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        config: ClientConfig | None = None,
        *,
        classes: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.classes = classes
        self.config = config or ClientConfig()
        self.rng = rng or random.Random()
        try:
            base = httpx.URL(self.base_url)
        except httpx.InvalidURL as e:
            raise ValueError(f"cannot read the server URL {base_url!r}: {e}") from e
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"the server URL must be http(s)://HOST[:PORT], got {base_url!r}")
        self._transport = transport or http_transport(self.config.max_connections)
        self._urls: dict[str, httpx.URL] = {}
        # only the headers that do something (see the module docstring)
        self._headers = (
            {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        )
        self.sent_bytes = 0  # every request this client put on the wire, probes included
        self.received_bytes = 0

    async def __aenter__(self) -> OffloadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    # -------------------------------------------------------------------------- requests

    async def infer(
        self,
        frame: bytes,
        request_id: str,
        *,
        deadline: float | None = None,
        input_name: str = INPUT_FRAME,
    ) -> InferResult:
        """Send one frame (`input_name` "image": an encoded image); `deadline` is a
        `time.monotonic()` instant bounding all attempts (and sent along, as the time left,
        so the server can drop work that comes late).

        Raises an OffloadError subclass (see the module docstring) with `attempts` and the
        bytes spent set.
        """
        path = f"/v2/models/{self.model}/infer"

        async def send(attempt_s: float, left: float, tally: Tally) -> InferResult:
            timeout_us = None if deadline is None else int(left * 1e6)
            body, header_len = _encode(frame, None, timeout_us, input_name=input_name)
            headers = {
                HEADER_LENGTH: str(header_len),
                "Content-Type": CONTENT_TYPE,
                "X-Request-ID": request_id,
            }
            try:
                response, ex = await self._exchange("POST", path, attempt_s, body, headers)
                tally.add(ex.request_bytes, ex.response_bytes, len(frame))
                answer = _answer(response, request_id, self.classes)
            except _AttemptFailed as e:
                tally.add(e.request_bytes, e.response_bytes, len(frame))
                raise e.error from None
            return tally.result(answer, ex.sent_at, ex.seconds, ex.server_s, ex.compute_s)

        return await with_retries(self.config, self.rng, deadline, send)

    def request_overhead(self) -> int:
        """Bytes an inference request puts on the wire besides its frame (a 19-character id,
        a deadline a second away)."""
        body, header_len = _encode(b"", None, timeout_us=1_000_000)
        headers = {
            HEADER_LENGTH: str(header_len),
            "Content-Type": CONTENT_TYPE,
            "X-Request-ID": "0" * 19,
        }
        request = self._request("POST", f"/v2/models/{self.model}/infer", 1.0, body, headers)
        return request_wire_bytes(request)

    async def metadata(self) -> dict[str, Any]:
        """`GET /v2/models/{model}`: the model's metadata (one attempt)."""
        try:
            response, _ = await self._exchange(
                "GET", f"/v2/models/{self.model}", self.config.timeout_s
            )
        except _AttemptFailed as e:
            raise e.error from None
        if response.status_code != 200:
            raise _status_error(response, f"model {self.model!r} metadata")
        try:
            meta = response.json()
        except ValueError as e:
            raise ServerFailed(f"{self.base_url} sent metadata that is not JSON: {e}") from e
        if not isinstance(meta, dict):
            raise ServerFailed(f"{self.base_url} sent metadata that is not a JSON object")
        return meta

    async def check_fingerprint(self, expected: str) -> dict[str, Any]:
        """Fetch the metadata and raise FingerprintRejected unless it names `expected`.

        A server whose metadata carries no fingerprint (e.g. Triton) passes: its answers to
        frames of another bundle are still refused per request (409).
        """
        meta = await self.metadata()
        served = metadata_fingerprint(meta)
        if served is not None and not _same_fingerprint(served, expected):
            raise FingerprintRejected(
                f"the server at {self.base_url} serves model {self.model!r} with fingerprint "
                f"{served[:16]}..., but this device's bundle has {expected[:16]}...: deploy the "
                "same bundle to the device and the server, or run with --local-only",
                status=409,
            )
        return meta

    async def probe(self, large: bool = False) -> Exchange:
        """One request to time the link, no inference (raises OffloadError).

        Small: `GET /v2/health/ready` (a few hundred bytes both ways); large: the model's
        metadata (about as many bytes as an inference request), so that probes alone tell
        bandwidth from round-trip time.
        """
        path = f"/v2/models/{self.model}" if large else "/v2/health/ready"
        try:
            response, ex = await self._exchange("GET", path, self.config.timeout_s)
        except _AttemptFailed as e:
            raise e.error from None
        if response.status_code != 200:
            raise _status_error(response, "link probe")
        return ex

    async def _exchange(
        self,
        method: str,
        path: str,
        timeout_s: float,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[httpx.Response, Exchange]:
        """One attempt bounded by `timeout_s` in all; raises _AttemptFailed."""
        request = self._request(method, path, timeout_s, body, headers)
        req_bytes = request_wire_bytes(request)
        start = time.monotonic()
        try:
            response = await within(timeout_s, fetch(self._transport, request))
        except httpx.ConnectTimeout as e:
            connect_s = request.extensions["timeout"]["connect"]
            raise _AttemptFailed(
                OffloadTimeout(f"connecting to {self.base_url} took over {connect_s:.3g} s")
            ) from e
        except (TimeoutError, httpx.TimeoutException) as e:
            self.sent_bytes += req_bytes
            raise _AttemptFailed(
                OffloadTimeout(f"{method} {path} got no answer within {timeout_s:.3g} s"), req_bytes
            ) from e
        except httpx.ConnectError as e:
            raise _AttemptFailed(
                ServerUnreachable(f"cannot connect to {self.base_url}: {e}")
            ) from e
        except httpx.TransportError as e:
            self.sent_bytes += req_bytes
            raise _AttemptFailed(
                ServerUnreachable(f"{method} {path} to {self.base_url} failed: {e!r}"), req_bytes
            ) from e
        seconds = time.monotonic() - start
        resp_bytes = response_wire_bytes(response)
        self.sent_bytes += req_bytes
        self.received_bytes += resp_bytes
        timing = server_timings(response)
        ex = Exchange(
            req_bytes, resp_bytes, start, seconds, timing_total(timing), timing.get("compute")
        )
        if method == "POST" and response.status_code != 200:
            raise _AttemptFailed(_status_error(response, "inference"), req_bytes, resp_bytes)
        return response, ex

    def _request(
        self,
        method: str,
        path: str,
        timeout_s: float,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Request:
        """The request as it goes on the wire: Host, Content-Length (POST), `headers`, and
        Authorization when a token is set; `timeout_s` for the transport's own timeouts."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        return httpx.Request(
            method,
            url,
            content=body,
            headers={**headers, **self._headers} if headers else self._headers,
            extensions={"timeout": timeouts(timeout_s, self.config.connect_timeout_s)},
        )


class _AttemptFailed(Exception):
    def __init__(self, error: OffloadError, request_bytes: int = 0, response_bytes: int = 0):
        super().__init__(str(error))
        self.error = error
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes


@dataclass
class Tally:
    """Attempts and bytes of one request, over its attempts."""

    attempts: int = 0
    frame_bytes: int = 0
    request_bytes: int = 0
    response_bytes: int = 0

    def add(self, request_bytes: int, response_bytes: int, frame: int) -> None:
        self.request_bytes += request_bytes
        self.response_bytes += response_bytes
        if request_bytes:  # the request (and its frame) went on the wire
            self.frame_bytes += frame

    def result(
        self,
        answer: Answer,
        sent_at: float,
        seconds: float,
        server_s: float | None,
        compute_s: float | None,
    ) -> InferResult:
        """The InferResult of the attempt that answered (times its own, bytes all attempts')."""
        return InferResult(
            answer,
            self.attempts,
            self.frame_bytes,
            self.request_bytes,
            self.response_bytes,
            sent_at,
            seconds,
            server_s,
            compute_s,
        )

    def stamp(self, error: OffloadError) -> OffloadError:
        error.attempts, error.frame_bytes = self.attempts, self.frame_bytes
        error.request_bytes, error.response_bytes = self.request_bytes, self.response_bytes
        return error


def _answer(response: httpx.Response, request_id: str, classes: int | None) -> Answer:
    try:
        return decode_response(response.content, response.headers, request_id, classes)
    except ProtocolError as e:
        raise _AttemptFailed(ServerFailed(f"bad answer from the server: {e}", status=200)) from e


def _status_error(response: httpx.Response, what: str) -> OffloadError:
    """The OffloadError for a non-200 answer, with the server's own message."""
    status = response.status_code
    message = f"{what}: HTTP {status} from {response.request.url}: {_error_text(response)}"
    if status in (429, 503, 504):
        return ServerBusy(message, status=status, retry_after_s=_retry_after(response))
    if status == 409:
        return FingerprintRejected(
            f"{message}; the device and the server run different bundles: deploy the same "
            "bundle to both (offloading is stopped for this run)",
            status=status,
        )
    if status in (401, 403):
        return OffloadRefused(
            f"{message}; pass the server's token with --token-file", status=status
        )
    if status == 404:
        return OffloadRefused(f"{message}; check --server and --model", status=status)
    if status in (400, 413):
        return RequestRejected(message, status=status)
    return ServerFailed(message, status=status)


def _error_text(response: httpx.Response) -> str:
    try:
        doc = response.json()
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"][:500]
    except ValueError:
        pass
    return response.text[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float:
    try:
        value = float(response.headers.get("retry-after", "0"))
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def server_timings(response: httpx.Response) -> dict[str, float]:
    """The durations a `Server-Timing` header gives, in seconds by lower-case name
    (`{"queue": ..., "compute": ..., "total": ...}` from our server); {} if none."""
    header = response.headers.get("server-timing")
    durations: dict[str, float] = {}
    for entry in (header or "").split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        for p in params:
            key, _, value = p.partition("=")
            if key.strip().lower() == "dur":
                with contextlib.suppress(ValueError):
                    ms = float(value.strip().strip('"'))
                    if math.isfinite(ms) and ms >= 0:
                        durations[name.lower()] = ms / 1e3
    return durations


def server_seconds(response: httpx.Response) -> float | None:
    """The server's own time for this request from `Server-Timing` (`total`, or the sum of
    all durations), None if it does not say."""
    return timing_total(server_timings(response))


def timing_total(durations: dict[str, float]) -> float | None:
    """The server's own seconds from `server_timings`: `total`, or the sum of all durations;
    None if there are none."""
    if not durations:
        return None
    return durations.get("total", sum(durations.values()))


def metadata_fingerprint(meta: dict[str, Any]) -> str | None:
    """The fingerprint a model's metadata announces (top level or in `parameters`)."""
    for doc in (meta, meta.get("parameters")):
        if isinstance(doc, dict) and isinstance(doc.get("fingerprint"), str):
            return doc["fingerprint"]
    return None


def _same_fingerprint(served: str, expected: str) -> bool:
    n = min(len(served), len(expected))
    return n >= 16 and served[:n].lower() == expected[:n].lower()


def request_wire_bytes(request: httpx.Request) -> int:
    """Bytes of an HTTP/1.1 request on the wire: request line, headers, blank line, body."""
    line = len(request.method) + 1 + len(request.url.raw_path) + len(" HTTP/1.1\r\n")
    headers = sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
    return line + headers + 2 + len(request.content)


def response_wire_bytes(response: httpx.Response) -> int:
    """Bytes of an HTTP/1.1 response on the wire (chunked framing not counted)."""
    line = len(f"{response.http_version} {response.status_code} {response.reason_phrase}\r\n")
    headers = sum(len(k) + len(v) + 4 for k, v in response.headers.raw)
    return line + headers + 2 + len(response.content)
