"""HTTP errors of the tail server: one class per status, each with an actionable message.

Every error answers `{"error": "<message>"}` (the Open Inference Protocol's error body), never
a stack trace. Status codes mean one thing each (see DESIGN.md, "Protocol").
"""

from __future__ import annotations

from collections.abc import Mapping


class ServerError(Exception):
    """An error with an HTTP status and a message safe to show the client."""

    status = 500
    outcome = "error"

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(ServerError):
    status, outcome = 400, "bad_request"


class Unauthorized(ServerError):
    status, outcome = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, {"WWW-Authenticate": 'Bearer realm="splitexit"'})


class NotFound(ServerError):
    status, outcome = 404, "not_found"


class RequestTimeout(ServerError):
    """The client did not send its whole request in time (it stopped short or stalled)."""

    status, outcome = 408, "client_timeout"


class Conflict(ServerError):
    """The frame or stream session is from another bundle (`errors.FingerprintMismatch`)."""

    status, outcome = 409, "fingerprint_mismatch"


class PayloadTooLarge(ServerError):
    status, outcome = 413, "too_large"


class UnsupportedMediaType(ServerError):
    status, outcome = 415, "bad_request"


class Overloaded(ServerError):
    status, outcome = 429, "overloaded"


class NotReady(ServerError):
    status, outcome = 503, "not_ready"


class DeadlineExceeded(ServerError):
    status, outcome = 504, "timeout"


def with_retry_after(error: ServerError, seconds: int) -> ServerError:
    """Add a `Retry-After` header (for 429 and 503) and return the error."""
    error.headers.setdefault("Retry-After", str(int(seconds)))
    return error
