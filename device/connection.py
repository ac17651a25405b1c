"""One open stream connection, and what the server's close codes and error answers mean.

reserve (an id from the window) ─ post (send the message) ─ wait (its answer, by a time)
reader: answer ─► the message's future │ error answer ─► its OffloadError
        garbage, or an answer to no message ─► close 1002, every message in flight fails
        closed (by the server, a lost pong, the network) ─► every message in flight fails
        with what the close code says (`close_error`)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from splitexit.protocol.errors import StreamError
from splitexit.protocol.stream import (
    CLOSE_DRAINING,
    CLOSE_FINGERPRINT,
    CLOSE_NOT_FOUND,
    CLOSE_PROTOCOL,
    CLOSE_UNAUTHORIZED,
    Accepted,
    Failure,
    Session,
    decode_answer,
    decode_failure,
    websocket_frame_bytes,
)

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
from .http import within


class NoStream(Exception):
    """The server (or what is in front of it) does not speak the stream: use HTTP."""


E = TypeVar("E", bound=BaseException)


def fresh(error: E) -> E:
    """A copy of `error` to raise once more: every offload that meets one failure (a lost
    connection, a refused connect) stamps its own attempts and bytes on its own copy."""
    new = BaseException.__new__(type(error))
    new.args = error.args
    new.__dict__.update(error.__dict__)
    return new


def handshake_refused(e: ConnectionClosed, url: str) -> OffloadError | NoStream:
    code = e.rcvd.code if e.rcvd is not None else 1006
    reason = e.rcvd.reason if e.rcvd is not None else "connection closed"
    return close_error(code, reason, url)


def close_error(code: int, reason: str, url: str) -> OffloadError | NoStream:
    """What a close code means to the device (see `splitexit.protocol.stream`)."""
    if code == CLOSE_FINGERPRINT:
        return FingerprintRejected(
            f"the stream at {url} refused this device's bundle: {reason}; deploy the same "
            "bundle to the device and the server (offloading is stopped for this run)",
            status=409,
        )
    if code in (CLOSE_UNAUTHORIZED, CLOSE_NOT_FOUND):
        return OffloadRefused(f"the stream at {url} refused: {reason}; check --server and --model")
    if code == CLOSE_PROTOCOL:
        return NoStream(f"the stream at {url} refused this session ({reason})")
    if code == CLOSE_DRAINING:
        return ServerBusy(f"the stream at {url} is not taking messages: {reason}", status=503)
    return ServerUnreachable(f"the stream at {url} closed ({code}: {reason})")


class Connection:
    """One open stream: its reader, its window of ids, the messages waiting for answers."""

    def __init__(self, ws: ClientConnection, accepted: Accepted, session: Session) -> None:
        self.ws = ws
        self.accepted = accepted
        self.session = session
        window = accepted.window
        self._free = list(range(window - 1, -1, -1))
        self._slots = asyncio.Semaphore(window)
        self._pending: dict[int, asyncio.Future[tuple[Any, int]]] = {}
        self.error: OffloadError | NoStream | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def alive(self) -> bool:
        return self.error is None

    async def reserve(self, stop: float) -> int:
        """A free message id, waiting for one until `stop` (the window is full meanwhile)."""
        try:
            await within(max(0.0, stop - time.monotonic()), self._slots.acquire())
        except TimeoutError:
            raise OffloadTimeout("the stream's window stayed full") from None
        if self.error is not None:
            self._slots.release()
            raise fresh(self.error)
        return self._free.pop()

    def release(self, mid: int) -> None:
        self._free.append(mid)
        self._slots.release()

    async def post(self, mid: int, message: bytes) -> asyncio.Future[tuple[Any, int]]:
        """Send message `mid`; the future of its answer and the answer's bytes on the wire.

        Raises ServerUnreachable (nothing went out) if the connection is gone."""
        future: asyncio.Future[tuple[Any, int]] = asyncio.get_running_loop().create_future()
        self._pending[mid] = future
        try:
            await self.ws.send(message)
        except ConnectionClosed:
            self._pending.pop(mid, None)
            self.release(mid)
            raise ServerUnreachable("the stream closed before the message went out") from None
        return future

    @staticmethod
    async def wait(future: asyncio.Future[tuple[Any, int]], stop: float) -> tuple[Any, int]:
        """The answer by `stop`; if it comes later, it is dropped (the id stays taken)."""
        try:
            return await within(max(0.0, stop - time.monotonic()), asyncio.shield(future))
        except TimeoutError:
            raise OffloadTimeout("no answer on the stream within the attempt's time") from None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader

    async def _read(self) -> None:
        session, classes = self.session, self.accepted.classes
        try:
            async for data in self.ws:
                if isinstance(data, str):
                    failure = decode_failure(data)
                    if failure.id is None or failure.id not in self._pending:
                        raise StreamError(f"an error answer for no message: {failure.message}")
                    self._answer(failure.id, _failure_error(failure), len(data.encode()))
                else:
                    reply = decode_answer(data, session, classes)
                    if reply.id not in self._pending:
                        raise StreamError(f"an answer to message {reply.id}, not in flight")
                    self._answer(reply.id, reply, len(data))
        except StreamError as e:
            self.error = ServerFailed(f"bad answer on the stream: {e}", status=200)
            await self.ws.close(1002, "bad answer")
        except ConnectionClosed:
            pass
        finally:
            if self.error is None:
                code = self.ws.close_code or 1006
                self.error = close_error(code, self.ws.close_reason or "closed", "the server")
                if isinstance(self.error, ServerBusy):  # drained: reconnect, maybe elsewhere
                    self.error = ServerUnreachable(f"the stream was drained ({code})")
            for mid in list(self._pending):
                self._answer(mid, fresh(self.error), 0)

    def _answer(self, mid: int, result: Any, nbytes: int) -> None:
        future = self._pending.pop(mid)
        self.release(mid)
        down = websocket_frame_bytes(nbytes, masked=False) if nbytes else 0
        if future.done():  # its attempt timed out: a late answer, dropped
            return
        if isinstance(result, BaseException):
            result.response_bytes = down  # type: ignore[attr-defined]
            future.set_exception(result)
        else:
            future.set_result((result, down))


def _failure_error(f: Failure) -> OffloadError:
    """The OffloadError for an error answer (`code` as the HTTP statuses it stands for)."""
    text = f"the stream answered {f.code}: {f.message}"
    if f.code == "busy":
        return ServerBusy(text, status=429, retry_after_s=f.retry_after_s)
    if f.code == "deadline":
        return ServerBusy(text, status=504)
    if f.code == "rejected":
        return RequestRejected(text, status=400)
    return ServerFailed(text, status=500)
